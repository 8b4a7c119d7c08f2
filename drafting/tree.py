"""Draft tree: the draft model expands it level by level (EAGLE-2 style), then the best nodes are picked for
verification, with the tree attention mask, per-node positions and the children table acceptance walks."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from drafting.kv_store import KVCache
from drafting.model import LeanDecoder
from drafting.strategy import DraftStrategy


@dataclass
class DraftTree:
    """Drafted nodes of every live sample; node index order = creation order, so parents come first."""

    tokens: torch.Tensor  # [B, N]
    parents: torch.Tensor  # [B, N] node index of the parent, -1 = the root (last committed token)
    values: torch.Tensor  # [B, N] product of draft probabilities along the path
    depth: torch.Tensor  # [N] level, 1-based
    anc: torch.Tensor  # [B, N, N] bool: anc[b, i, j] = node j is node i or one of its ancestors
    size: int  # nodes drafted (N)


@dataclass
class VerifyTree:
    """Root + chosen nodes per sample, padded to a common width T = 1 + max chosen."""

    tokens: torch.Tensor  # [B, T]
    depth: torch.Tensor  # [B, T] (root 0); RoPE position = context length - 1 + depth
    mask: torch.Tensor  # [B, T, T] bool: node sees itself and its ancestors
    valid: torch.Tensor  # [B, T] bool (root always valid)
    children: torch.Tensor  # [B, T, K] verify indices of children in draft-rank order, -1 = none
    values: torch.Tensor  # [B, T - 1] draft values of the chosen nodes
    counts: torch.Tensor  # [B] chosen nodes per sample


def draft_probs(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Draft distribution used to rank children (any proposal keeps acceptance lossless): [..., V]."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).to(logits.dtype)
    return (logits / t.view(-1, *([1] * (logits.dim() - 1)))).float().softmax(dim=-1)


class TreeDrafter:
    """Builds draft trees with the draft model; owns the scratch K/V of drafted nodes (never in the cache)."""

    def __init__(self, draft: LeanDecoder, slots: int, max_nodes: int):
        s = draft.shape
        self.draft = draft
        self.buf_k = torch.zeros(s.layers, slots, s.kv_heads, max_nodes, s.head_dim, device=draft.device,
                                 dtype=draft.dtype)  # [L, slots, Hkv, N, D]
        self.buf_v = torch.zeros_like(self.buf_k)

    def build(self, strategy: DraftStrategy, cache: KVCache, n: torch.Tensor, root_q: torch.Tensor,
              temperature: torch.Tensor, ctx: int) -> DraftTree:
        """n [B]: committed lengths (the draft cache holds all n tokens); root_q [B, V]: draft probs after the
        root; ctx = max(n). Returns the drafted tree (levels 1..depth)."""
        B, k, dev = n.shape[0], strategy.topk, n.device
        N = k + (strategy.depth - 1) * k * k
        tokens = torch.zeros(B, N, dtype=torch.long, device=dev)
        parents = torch.full((B, N), -1, dtype=torch.long, device=dev)
        values = torch.zeros(B, N, dtype=torch.float32, device=dev)
        depth = torch.zeros(N, dtype=torch.long, device=dev)
        anc = torch.zeros(B, N, N, dtype=torch.bool, device=dev)
        ar = torch.arange(N, device=dev)

        vals, toks = root_q.topk(k, dim=-1)  # [B, k]
        tokens[:, :k], values[:, :k], depth[:k] = toks, vals, 1
        anc[:, ar[:k], ar[:k]] = True
        frontier = ar[:k].expand(B, k)  # [B, k] node indices to expand next
        size, level = k, 1
        rows = slice(0, B)
        bidx = torch.arange(B, device=dev)[:, None].expand(B, k)
        ctx_mask = torch.arange(ctx, device=dev)[None, :] < n[:, None]  # [B, ctx]
        while strategy.expand_more(level, values.gather(1, frontier), B, ctx):
            # draft forward over the frontier: each node sees the context, its ancestors' scratch K/V, itself
            f_anc = anc[bidx, frontier, :size] & (ar[:size][None, None, :] != frontier[..., None])  # [B, k, size]
            mask = torch.cat([ctx_mask[:, None, :].expand(B, k, ctx), f_anc,
                              torch.eye(k, dtype=torch.bool, device=dev).expand(B, k, k)], dim=2)
            positions = (n - 1 + level)[:, None].expand(B, k)
            extra = (self.buf_k[:, :B, :, :size], self.buf_v[:, :B, :, :size])
            logits, (fk, fv) = self.draft.forward(tokens.gather(1, frontier), positions, mask, cache, rows, ctx,
                                                  extra=extra, keep_kv=True)  # logits [B, k, V]
            self.buf_k[:, bidx, :, frontier] = fk.permute(1, 3, 0, 2, 4)  # [B, k, L, Hkv, D]
            self.buf_v[:, bidx, :, frontier] = fv.permute(1, 3, 0, 2, 4)
            q = draft_probs(logits, temperature)  # [B, k, V]
            cp, ct = q.topk(k, dim=-1)  # [B, k, k]: children of each frontier node
            new = slice(size, size + k * k)
            tokens[:, new] = ct.reshape(B, k * k)
            values[:, new] = (values.gather(1, frontier)[..., None] * cp).reshape(B, k * k)
            par = frontier[..., None].expand(B, k, k).reshape(B, k * k)
            parents[:, new] = par
            depth[new] = level + 1
            anc[:, new] = anc.gather(1, par[..., None].expand(B, k * k, N))
            anc[:, ar[new], ar[new]] = True
            frontier = size + values[:, new].topk(k, dim=-1).indices  # best k of the new level
            size += k * k
            level += 1
        return DraftTree(tokens[:, :size], parents[:, :size], values[:, :size], depth[:size],
                         anc[:, :size, :size], size)


def select_nodes(tree: DraftTree, root_tokens: torch.Tensor, counts: int | torch.Tensor, topk: int) -> VerifyTree:
    """Keep the top-`counts` nodes by value per sample; a valid subtree because a child's value never
    exceeds its parent's and ties go to the earlier (parent-first) index."""
    B, dev = tree.tokens.shape[0], tree.tokens.device
    if isinstance(counts, int):
        counts = torch.full((B,), counts, dtype=torch.long, device=dev)
    counts = counts.clamp(0, tree.size)
    c = int(counts.max()) if B else 0
    order = tree.values.sort(dim=1, descending=True, stable=True).indices[:, :c]  # [B, c] best first
    valid_by_rank = torch.arange(c, device=dev)[None, :] < counts[:, None]
    sel, perm = order.sort(dim=1)  # parents before children
    valid = valid_by_rank.gather(1, perm)  # [B, c]
    T = c + 1
    bidx = torch.arange(B, device=dev)[:, None]
    tokens = torch.cat([root_tokens[:, None], tree.tokens.gather(1, sel)], dim=1)  # [B, T]
    depth = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), tree.depth[sel]], dim=1)
    mask = torch.zeros(B, T, T, dtype=torch.bool, device=dev)
    mask[:, :, 0] = True  # everyone sees the root
    mask[:, 1:, 1:] = tree.anc[bidx[..., None], sel[:, :, None], sel[:, None, :]]
    # parent of each chosen node in verify numbering (root = 0)
    inv = torch.zeros(B, tree.size + 1, dtype=torch.long, device=dev)
    inv.scatter_(1, sel, torch.arange(1, T, device=dev).expand(B, c).contiguous())
    ppool = tree.parents.gather(1, sel)  # [B, c]
    vparent = torch.where(ppool < 0, torch.zeros_like(ppool), inv.gather(1, ppool.clamp(min=0)))
    # children table: rank among valid siblings in index order (= draft-probability order)
    same = (vparent[:, :, None] == vparent[:, None, :]) & valid[:, None, :] & valid[:, :, None]
    rank = (same & (torch.arange(c, device=dev)[None, :] < torch.arange(c, device=dev)[:, None])).sum(-1)
    flat = torch.where(valid, vparent * topk + rank, torch.full_like(rank, T * topk))  # invalid -> dump column
    children = torch.full((B, T * topk + 1), -1, dtype=torch.long, device=dev)
    children.scatter_(1, flat, torch.arange(1, T, device=dev).expand(B, c).contiguous())
    return VerifyTree(tokens, depth, mask, torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev), valid], 1),
                      children[:, :-1].view(B, T, topk), tree.values.gather(1, sel), counts)
