"""Draft tree: the draft model grows it level by level (EAGLE-2 style: the best `width` nodes of the newest
level each get `topk` children), a strategy picks which nodes to verify, and the chosen nodes become a
verify tree with its attention mask, per-node positions and the children table acceptance walks.

Children are the draft's best guesses of the target's token under the sample's position-keyed noise
(`drafting.noise`), so the choice of nodes changes speed, never the emitted tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from drafting.kv_store import KVCache
from drafting.model import LeanDecoder
from drafting.noise import GumbelScheme, coupled_candidates, position_keys


@dataclass
class DraftTree:
    """Drafted nodes of every live sample; node index order = creation order, so parents come first."""

    tokens: torch.Tensor  # [B, N]
    parents: torch.Tensor  # [B, N] node index of the parent, -1 = the root (last committed token)
    value: torch.Tensor  # [B, N] product of draft probabilities along the path
    q: torch.Tensor  # [B, N] the node's own draft probability
    margin: torch.Tensor  # [B, N] perturbed-score margin of the node among its parent's candidates
    depth: torch.Tensor  # [N] level, 1-based
    rank: torch.Tensor  # [N] rank among its siblings (0 = the draft's best guess)
    anc: torch.Tensor  # [B, N, N] bool: anc[b, i, j] = node j is node i or one of its ancestors
    frontier: torch.Tensor  # [B, w] nodes of the newest level to expand next
    score: torch.Tensor  # [B, N] what the strategy ranks nodes by (value, or predicted path acceptance)
    cond: torch.Tensor | None = None  # [B, <= N] predicted acceptance given the parent (adaptive strategy)

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    @property
    def levels(self) -> int:
        return int(self.depth[-1]) if self.size else 0


@dataclass
class VerifyTree:
    """Root + chosen nodes per sample, padded to a common width T = 1 + max chosen (padding is packed away
    in the verify forward)."""

    tokens: torch.Tensor  # [B, T]
    depth: torch.Tensor  # [B, T] (root 0); RoPE position = committed length - 1 + depth
    mask: torch.Tensor  # [B, T, T] bool: node sees itself and its ancestors
    valid: torch.Tensor  # [B, T] bool (root always valid)
    children: torch.Tensor  # [B, T, K] verify indices of children in draft-rank order, -1 = none
    node: torch.Tensor  # [B, T - 1] draft-tree index of each chosen node (valid entries only)
    counts: torch.Tensor  # [B] chosen nodes per sample


class TreeDrafter:
    """Grows draft trees with the draft model; owns the scratch K/V of drafted nodes (never in the cache)."""

    def __init__(self, draft: LeanDecoder, slots: int, max_nodes: int, scheme=None):
        s = draft.shape
        self.draft = draft
        self.scheme = scheme or GumbelScheme()
        self.max_nodes = max_nodes
        self.buf_k = torch.zeros(s.layers, slots, s.kv_heads, max_nodes, s.head_dim, device=draft.device,
                                 dtype=draft.dtype)  # [L, slots, Hkv, N, D]
        self.buf_v = torch.zeros_like(self.buf_k)

    def candidates(self, probs: torch.Tensor, seed: torch.Tensor, position: torch.Tensor, greedy: torch.Tensor,
                   k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Children of M parents: probs [M, V] the draft's processed distribution for token index position [M];
        greedy rows rank by draft probability, sampled rows under the position-keyed noise."""
        tok, margin = coupled_candidates(probs, None, k, block)
        sampled = (~greedy).nonzero().squeeze(1)
        if sampled.numel():
            keys = position_keys(seed[sampled], position[sampled])
            st, sm = self.scheme.candidates(probs[sampled], keys, k, block)
            tok[sampled], margin[sampled] = st, sm
        return tok, margin

    def start(self, root_q: torch.Tensor, n: torch.Tensor, seed: torch.Tensor, greedy: torch.Tensor, k: int,
              width: int, block: int) -> DraftTree:
        """Level 1: the root's k children. root_q [B, V] = the draft's distribution for token index n [B]."""
        B, dev = root_q.shape[0], root_q.device
        tok, margin = self.candidates(root_q, seed, n, greedy, k, block)
        q = root_q.gather(1, tok)
        ar = torch.arange(k, device=dev)
        anc = torch.zeros(B, k, k, dtype=torch.bool, device=dev)
        anc[:, ar, ar] = True
        tree = DraftTree(tok, torch.full((B, k), -1, dtype=torch.long, device=dev), q.clone(), q, margin,
                         torch.ones(k, dtype=torch.long, device=dev), ar.clone(), anc,
                         frontier=ar[:0].expand(B, 0), score=q.clone())
        return tree

    def choose_frontier(self, tree: DraftTree, width: int) -> None:
        """The best `width` nodes of the newest level by the strategy's score expand next."""
        newest = (tree.depth == tree.levels).nonzero().squeeze(1)  # [M] node indices of the newest level
        w = min(width, newest.numel())
        tree.frontier = newest[tree.score[:, newest].topk(w, dim=1).indices]  # [B, w]

    def grow(self, tree: DraftTree, cache: KVCache, n: torch.Tensor, ctx: int, seed: torch.Tensor,
             greedy: torch.Tensor, process, k: int, block: int) -> DraftTree:
        """One more level: a draft forward over the frontier, then k children per frontier node.

        n [B] committed lengths (the draft cache holds them all); ctx = max(n); process(logits [B, w, V]) gives
        the draft's processed probabilities [B * w, V]."""
        B, dev = n.shape[0], n.device
        frontier, size, level = tree.frontier, tree.size, tree.levels
        w = frontier.shape[1]
        if size + w * k > self.max_nodes:
            raise ValueError(f"draft tree of {size + w * k} nodes exceeds the scratch buffer ({self.max_nodes})")
        ar = torch.arange(size, device=dev)
        bidx = torch.arange(B, device=dev)[:, None].expand(B, w)
        # each frontier node sees the context, its ancestors' scratch K/V and itself
        ctx_mask = torch.arange(ctx, device=dev)[None, :] < n[:, None]  # [B, ctx]
        f_anc = tree.anc[bidx, frontier] & (ar[None, None, :] != frontier[..., None])  # [B, w, size]
        mask = torch.cat([ctx_mask[:, None, :].expand(B, w, ctx), f_anc,
                          torch.eye(w, dtype=torch.bool, device=dev).expand(B, w, w)], dim=2)
        positions = (n - 1 + level)[:, None].expand(B, w)
        extra = (self.buf_k[:, :B, :, :size], self.buf_v[:, :B, :, :size])
        logits, (fk, fv) = self.draft.forward(tree.tokens.gather(1, frontier), positions, mask, cache,
                                              slice(0, B), ctx, extra=extra, keep_kv=True)  # logits [B, w, V]
        self.buf_k[:, bidx, :, frontier] = fk.permute(1, 3, 0, 2, 4)  # [B, w, L, Hkv, D]
        self.buf_v[:, bidx, :, frontier] = fv.permute(1, 3, 0, 2, 4)
        probs = process(logits)  # [B * w, V]
        rep = lambda x: x.repeat_interleave(w)  # noqa: E731
        tok, margin = self.candidates(probs, rep(seed), rep(n + level), rep(greedy), k, block)  # [B * w, k]
        q = probs.gather(1, tok).reshape(B, w * k)
        par = frontier[..., None].expand(B, w, k).reshape(B, w * k)
        M = w * k
        N = size + M
        anc = torch.zeros(B, N, N, dtype=torch.bool, device=dev)
        anc[:, :size, :size] = tree.anc
        anc[:, size:, :size] = tree.anc.gather(1, par[..., None].expand(B, M, size))
        new = torch.arange(size, N, device=dev)
        anc[:, new, new] = True
        value = tree.value.gather(1, par) * q
        cat = lambda a, b: torch.cat([a, b], dim=-1)  # noqa: E731
        return DraftTree(cat(tree.tokens, tok.reshape(B, M)), cat(tree.parents, par), cat(tree.value, value),
                         cat(tree.q, q), cat(tree.margin, margin.reshape(B, M)),
                         cat(tree.depth, torch.full((M,), level + 1, dtype=torch.long, device=dev)),
                         cat(tree.rank, torch.arange(k, device=dev).repeat(w)), anc, frontier,
                         cat(tree.score, value), tree.cond)


def close_under_ancestors(tree: DraftTree, chosen: torch.Tensor) -> torch.Tensor:
    """chosen [B, N] bool plus every ancestor of a chosen node: a node is only verified with its parent."""
    return (tree.anc & chosen[:, :, None]).any(dim=1)


def top_per_sample(score: torch.Tensor, counts: int | torch.Tensor) -> torch.Tensor:
    """[B, N] bool: each sample's `counts` best nodes by score, ties to the earlier (parent-first) index."""
    B, N = score.shape
    if isinstance(counts, int):
        counts = torch.full((B,), counts, dtype=torch.long, device=score.device)
    order = score.sort(dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=score.device).expand(B, N))
    return rank < counts[:, None]


def verify_tree(tree: DraftTree, chosen: torch.Tensor, root_tokens: torch.Tensor, topk: int) -> VerifyTree:
    """The chosen nodes (ancestor-closed [B, N] bool) of each sample, in creation order, as a verify tree."""
    B, N = chosen.shape
    dev = chosen.device
    counts = chosen.sum(1)
    c = int(counts.max()) if B else 0
    idx = torch.arange(N, device=dev)
    sel = torch.where(chosen, idx, idx + N).sort(dim=1).values[:, :c]  # chosen first, parents before children
    valid = torch.arange(c, device=dev)[None, :] < counts[:, None]  # [B, c]
    sel = torch.where(valid, sel, torch.zeros_like(sel))  # padding points at node 0, masked out below
    T = c + 1
    bidx = torch.arange(B, device=dev)[:, None]
    tokens = torch.cat([root_tokens[:, None], tree.tokens.gather(1, sel)], dim=1)  # [B, T]
    depth = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), tree.depth[sel]], dim=1)
    mask = torch.zeros(B, T, T, dtype=torch.bool, device=dev)
    mask[:, :, 0] = True  # everyone sees the root
    mask[:, 1:, 1:] = tree.anc[bidx[..., None], sel[:, :, None], sel[:, None, :]] & valid[:, None, :]
    # parent of each chosen node in verify numbering (root = 0)
    inv = torch.zeros(B, N + 1, dtype=torch.long, device=dev)
    inv.scatter_(1, torch.where(valid, sel, N), torch.arange(1, T, device=dev).expand(B, c).contiguous())
    ppool = tree.parents.gather(1, sel)  # [B, c]
    vparent = torch.where(ppool < 0, torch.zeros_like(ppool), inv.gather(1, ppool.clamp(min=0)))
    # children table: rank among valid siblings in index order (= draft rank order)
    same = (vparent[:, :, None] == vparent[:, None, :]) & valid[:, None, :] & valid[:, :, None]
    rank = (same & (torch.arange(c, device=dev)[None, :] < torch.arange(c, device=dev)[:, None])).sum(-1)
    flat = torch.where(valid, vparent * topk + rank, torch.full_like(rank, T * topk))  # invalid -> dump column
    children = torch.full((B, T * topk + 1), -1, dtype=torch.long, device=dev)
    children.scatter_(1, flat, torch.arange(1, T, device=dev).expand(B, c).contiguous())
    return VerifyTree(tokens, depth, mask, torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev), valid], 1),
                      children[:, :-1].view(B, T, topk), sel, counts)
