"""Draft tree: the draft model grows it level by level (EAGLE-2 style: the best `width` nodes of the newest
level each get `topk` children), a strategy picks which nodes to verify, and the chosen nodes become a
verify tree with its attention mask, per-node positions and the children table acceptance walks.

Children are the draft's best guesses of the target's token under the sample's position-keyed noise
(`drafting.noise`), so the choice of nodes changes speed, never the emitted tokens.

Every array lives in a preallocated buffer of `max_nodes` nodes per slot and each level writes its own slice,
so a level's shape depends only on (live rows, frontier width, nodes so far): static, sync-free, capturable
in a CUDA graph. The drafted nodes' K/V go into the draft cache right after each row's committed columns
(node i at column n + i), where the tree attention reads them in place."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from drafting.spec.noise import GumbelScheme, coupled_candidates, position_keys

CHAIN_SOURCE = 3  # `TreeDrafter.source_id` of a rollout chain's nodes (1: a draft model, 2: a head)


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
    frontier: torch.Tensor  # [B, w] nodes of the newest level expanded last
    score: torch.Tensor  # [B, N] what the strategy ranks nodes by (value, or predicted path acceptance)
    cond: torch.Tensor | None = None  # [B, N] predicted acceptance given the parent (adaptive strategy)

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    @property
    def levels(self) -> int:
        """(A host read: the engine passes level counts it already knows instead.)"""
        return int(self.depth[-1]) if self.size else 0


@dataclass
class VerifyTree:
    """Root + chosen nodes per sample, padded to a common width T (padding is packed away in an eager verify
    forward, and computed as masked work under a CUDA graph)."""

    tokens: torch.Tensor  # [B, T]
    depth: torch.Tensor  # [B, T] (root 0); RoPE position = committed length - 1 + depth
    mask: torch.Tensor  # [B, T, T] bool: node sees itself and its ancestors
    valid: torch.Tensor  # [B, T] bool (root always valid)
    children: torch.Tensor  # [B, T, K] verify indices of children in draft-rank order, -1 = none
    node: torch.Tensor  # [B, T - 1] draft-tree index of each chosen node (valid entries only)
    counts: torch.Tensor  # [B] chosen nodes per sample


class TreeDrafter:
    """Grows draft trees with the draft model into preallocated per-slot node buffers."""

    def __init__(self, source, slots: int, max_nodes: int, scheme=None, chain: int = 0,
                 device: torch.device | None = None):
        """source: what proposes the nodes (`drafting.spec.sources`; None: no draft model, the chain alone). A
        source with state (`features` > 0, a head) keeps it in feat [slots, 1 + N, H]: at the root (index 0) and
        at each expanded node (1 + node index), which children read.

        chain: nodes [0, chain) of every tree are a rollout draft's chain (`drafting.spec.suffix`), placed by
        `place_chain` from host-given tokens: node j at depth j + 1, child of node j - 1 (the first of the root).
        The model's nodes follow from index `chain` on. The chain's shape is the same for every row and step, so
        only its tokens and scores change: shapes stay static."""
        self.source = source
        self.scheme = scheme or GumbelScheme()
        self.max_nodes = N = max_nodes
        self.chain = D = chain
        dev = source.decoder.device if source is not None else device
        features = source.features if source is not None else 0
        z = lambda *shape, dt=torch.float32: torch.zeros(*shape, dtype=dt, device=dev)  # noqa: E731
        self.tokens, self.parents = z(slots, N, dt=torch.long), z(slots, N, dt=torch.long)
        self.value, self.q, self.margin, self.score, self.cond = (z(slots, N) for _ in range(5))
        self.depth, self.rank = z(N, dt=torch.long), z(N, dt=torch.long)
        self.anc = z(slots, N, N, dt=torch.bool)
        self.frontier = z(slots, N, dt=torch.long)
        self.source_id = z(slots, N, dt=torch.long)  # which source proposed each node
        self.feat = z(slots, 1 + N, features, dt=source.decoder.dtype) if features else None
        if D:  # the chain's fixed shape
            j = torch.arange(D, device=dev)
            self.parents[:, :D] = j - 1
            self.depth[:D] = j + 1
            self.anc[:, :D, :D] = j[None, :] <= j[:, None]
            self.source_id[:, :D] = CHAIN_SOURCE

    def place_chain(self, B: int, tokens: torch.Tensor, score: torch.Tensor) -> None:
        """The rows' chains into nodes [0, chain): tokens [B, D], score [B, D] their predicted path acceptance (0
        past a row's chain: a node never worth verifying)."""
        D = self.chain
        j = torch.arange(D, device=tokens.device)
        self.parents[:B, :D] = j - 1  # the chain's own shape (a step may have grafted it: `graft_chain`)
        self.anc[:B, :D] = False
        self.anc[:B, :D, :D] = j[None, :] <= j[:, None]
        self.tokens[:B, :D], self.score[:B, :D], self.value[:B, :D] = tokens, score, score
        self.cond[:B, :D] = score / torch.cat([torch.ones_like(score[:, :1]), score[:, :-1]], 1).clamp(min=1e-9)
        self.q[:B, :D], self.margin[:B, :D] = 1.0, 0.0

    def view(self, B: int, size: int, width: int = 0) -> DraftTree:
        """The first `size` nodes of rows 0..B-1 (views: writes go to the buffers)."""
        return DraftTree(self.tokens[:B, :size], self.parents[:B, :size], self.value[:B, :size], self.q[:B, :size],
                         self.margin[:B, :size], self.depth[:size], self.rank[:size], self.anc[:B, :size, :size],
                         self.frontier[:B, :width], self.score[:B, :size], self.cond[:B, :size])

    def candidates(self, probs: torch.Tensor, seed: torch.Tensor, position: torch.Tensor, greedy: torch.Tensor,
                   k: int, block: int, sampled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Children of M parents: probs [M, V] the draft's processed distribution for token index position [M];
        greedy rows rank by draft probability, sampled rows under the position-keyed noise (computed for every
        row when `sampled`, any row is, and picked per row: no data-dependent shapes)."""
        tok, margin = coupled_candidates(probs, None, k, block)
        if sampled:
            st, sm = self.scheme.candidates(probs, position_keys(seed, position), k, block)
            tok = torch.where(greedy[:, None], tok, st)
            margin = torch.where(greedy[:, None], margin, sm)
        return tok, margin

    def start(self, B: int, root_q: torch.Tensor, n: torch.Tensor, seed: torch.Tensor, greedy: torch.Tensor,
              k: int, block: int, sampled: bool) -> DraftTree:
        """Level 1: the root's k children. root_q [B, V] = the draft's distribution for token index n [B]."""
        dev, N, D = root_q.device, self.max_nodes, self.chain
        tok, margin = self.candidates(root_q, seed, n, greedy, k, block, sampled)
        q = root_q.gather(1, tok)
        new = slice(D, D + k)  # after the chain's nodes
        self.tokens[:B, new], self.margin[:B, new] = tok, margin
        self.q[:B, new], self.value[:B, new], self.score[:B, new], self.cond[:B, new] = q, q, q, q
        self.parents[:B, new] = -1
        self.depth[new] = 1
        self.rank[new] = torch.arange(k, device=dev)
        # full rows: no stale ancestor bits
        self.anc[:B, new] = torch.eye(k, N, dtype=torch.bool, device=dev).roll(D, dims=1)
        self.source_id[:B, new] = self.source.id
        return self.view(B, D + k)

    def grow(self, B: int, size: int, newest: int, level: int, width: int, k: int,
             n: torch.Tensor, seed: torch.Tensor, greedy: torch.Tensor, process, block: int, sampled: bool,
             kv_len: int) -> DraftTree:
        """Level `level` + 1: a draft forward over the `width` best nodes of the newest level (the last `newest`
        of `size` nodes, depth `level`), then k children each.

        n [B] committed lengths (the draft cache holds them all; node i's K/V go to column n + i); process(logits
        [B, w, V]) gives the draft's processed probabilities [B * w, V]."""
        dev, N = n.device, self.max_nodes
        M = width * k
        if size + M > N:
            raise ValueError(f"draft tree of {size + M} nodes exceeds the node buffers ({N})")
        frontier = (size - newest) + self.score[:B, size - newest:size].topk(width, dim=1).indices  # [B, w]
        self.frontier[:B, :width] = frontier
        bidx = torch.arange(B, device=dev)[:, None]
        tail = self.anc[bidx, frontier, :size]  # [B, w, size]: ancestors and itself
        positions = (n - 1 + level)[:, None].expand(B, width)
        parent_state = None
        if self.feat is not None:  # the state the source left at each frontier node's parent
            parent_state = self.feat[bidx, self.parents[:B].gather(1, frontier) + 1]  # [B, w, H]
        logits, state = self.source.expand(B, self.tokens[:B].gather(1, frontier), positions, n[:, None] + frontier,
                                           n, tail, kv_len, parent_state)  # [B, w, V]
        if state is not None:
            self.feat[bidx, frontier + 1] = state

        probs = process(logits)  # [B * w, V]
        rep = lambda x: x.repeat_interleave(width, output_size=B * width)  # noqa: E731
        tok, margin = self.candidates(probs, rep(seed), rep(n + level), rep(greedy), k, block, sampled)  # [B w, k]
        q = probs.gather(1, tok).reshape(B, M)
        par = frontier[..., None].expand(B, width, k).reshape(B, M)
        new = slice(size, size + M)
        self.tokens[:B, new], self.parents[:B, new] = tok.reshape(B, M), par
        self.q[:B, new], self.margin[:B, new] = q, margin.reshape(B, M)
        self.value[:B, new] = self.value[:B].gather(1, par) * q
        self.score[:B, new] = self.value[:B, new]
        self.depth[new] = level + 1
        self.rank[new] = torch.arange(k, device=dev).repeat(width)
        self.anc[:B, new] = self.anc[:B].gather(1, par[..., None].expand(B, M, N))
        self.anc[:B, new, new] |= torch.eye(M, dtype=torch.bool, device=dev)
        self.source_id[:B, new] = self.source.id
        return self.view(B, size + M, width)


def graft_chain(tree: DraftTree, at: torch.Tensor, r: torch.Tensor, chain: int) -> None:
    """Where the model's nodes spell the first r[b] tokens of row b's chain (the last of them model node at[b]),
    the chain goes on from there: its node r[b] becomes a child of at[b], so the model's path and the chain's
    continuation are verified once, as one branch (the chain's first r[b] nodes, the model's again, are left out).
    r [B] (0: the chain stays on the root; chain: all of it is the model's), at [B] draft-tree indices."""
    B, N = tree.parents.shape
    dev = tree.parents.device
    j = torch.arange(chain, device=dev)
    rows = (r > 0) & (r < chain)
    if not bool(rows.any()):
        return
    tree.parents[:, :chain] = torch.where(rows[:, None] & (j[None, :] == r[:, None]), at[:, None],
                                          tree.parents[:, :chain])
    base = tree.anc[torch.arange(B, device=dev), at.clamp(min=0)]  # [B, N] the graft point and its ancestors
    col = torch.arange(N, device=dev)
    own = (col[None, None, :] >= r[:, None, None]) & (col[None, None, :] <= j[None, :, None])  # [B, D, N]
    moved = (rows[:, None] & (j[None, :] >= r[:, None]))[..., None]
    tree.anc[:, :chain] = torch.where(moved, base[:, None, :] | own, tree.anc[:, :chain])


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


def verify_tree(tree: DraftTree, chosen: torch.Tensor, root_tokens: torch.Tensor, topk: int,
                width: int | None = None) -> VerifyTree:
    """The chosen nodes (ancestor-closed [B, N] bool) of each sample, in creation order, as a verify tree of
    `width` = 1 + nodes per sample (None: 1 + the most chosen by one sample, a host read). A sample with more
    chosen nodes keeps the earliest, still ancestor-closed: parents come before their children."""
    B, N = chosen.shape
    dev = chosen.device
    c = (int(chosen.sum(1).max()) if B else 0) if width is None else width - 1
    counts = chosen.sum(1).clamp(max=c)
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
