"""Lossless acceptance of a verified draft tree, vectorised over the batch (a loop over depth only).

At every verify node the target picks its token: the argmax for greedy requests, the position-keyed
Gumbel-max of the processed distribution p otherwise (`drafting.noise`). Acceptance walks the tree like greedy
verification: follow the child whose token equals the node's target token, stop where there is none and emit
the target token there. Every emitted token is exactly p-distributed and equals what plain decoding with the
same seed emits, whatever was drafted."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from drafting.spec.tree import VerifyTree


@dataclass
class Acceptance:
    tokens: torch.Tensor  # [B, D + 1] accepted draft tokens then the correction/bonus token
    count: torch.Tensor  # [B] emitted tokens (= accepted + 1)
    path: torch.Tensor  # [B, D] verify indices of the accepted nodes in order (0-padded)
    at: torch.Tensor  # [B, D + 1] verify index of the node each emitted token was chosen at
    on_path: torch.Tensor  # [B, T] bool: node accepted (the root always)


def walk(vt: VerifyTree, target: torch.Tensor, max_depth: int, longest: bool = False) -> Acceptance:
    """target [B, T]: the target's token at every verify node. Pure indexing, one loop over depth.

    longest: two children of a node may carry the same token (a rollout chain beside the model's branch); any
    child whose token is the target's is a correct continuation, so follow the one whose accepted run below goes
    deepest (found bottom-up first, one more loop over depth)."""
    B, T = target.shape
    dev = target.device
    run = None
    if longest:
        K = vt.children.shape[2]
        ch = vt.children.clamp(min=0).view(B, T * K)
        hits = (vt.children >= 0) & (vt.tokens.gather(1, ch).view(B, T, K) == target[:, :, None])
        run = torch.zeros(B, T, dtype=torch.long, device=dev)  # longest accepted run below each node
        for _ in range(max_depth):
            run = torch.where(hits, run.gather(1, ch).view(B, T, K) + 1, 0).amax(dim=2)
    bidx = torch.arange(B, device=dev)
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    n_acc = torch.zeros(B, dtype=torch.long, device=dev)
    at = torch.zeros(B, max_depth + 1, dtype=torch.long, device=dev)
    path = torch.zeros(B, max(max_depth, 1), dtype=torch.long, device=dev)
    on_path = torch.zeros(B, T, dtype=torch.bool, device=dev)
    on_path[:, 0] = True
    for level in range(max_depth):
        ch = vt.children[bidx, cur]  # [B, K]
        hit = (ch >= 0) & (vt.tokens.gather(1, ch.clamp(min=0)) == target[bidx, cur][:, None])
        moved = active & hit.any(dim=1)  # (no early exit: that would read the device every level)
        pick = hit.to(torch.int8) if run is None else torch.where(hit, run.gather(1, ch.clamp(min=0)) + 1, 0)
        node = ch.gather(1, pick.argmax(dim=1, keepdim=True)).squeeze(1)
        cur = torch.where(moved, node, cur)
        path[:, level] = torch.where(moved, node, path[:, level])
        at[:, level + 1] = cur
        on_path[bidx, cur] |= moved
        n_acc += moved.long()
        active = moved
    # emitted: the accepted nodes' tokens, then the target's token where the walk stopped
    j = torch.arange(max_depth + 1, device=dev)
    at = torch.where(j[None, :] <= n_acc[:, None], at, cur[:, None])
    tokens = torch.where(j[None, :] < n_acc[:, None], vt.tokens.gather(1, at.roll(-1, dims=1)), target.gather(1, at))
    return Acceptance(tokens, n_acc + 1, path, at, on_path)
