"""Lossless acceptance of a verified draft tree, vectorised over the batch (a loop over depth only).

At every verify node the target picks its token: the argmax for greedy requests, the position-keyed
Gumbel-max of the processed distribution p otherwise (`drafting.noise`). Acceptance walks the tree like greedy
verification: follow the child whose token equals the node's target token, stop where there is none and emit
the target token there. Every emitted token is exactly p-distributed and equals what plain decoding with the
same seed emits, whatever was drafted."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from drafting.tree import VerifyTree


@dataclass
class Acceptance:
    tokens: torch.Tensor  # [B, D + 1] accepted draft tokens then the correction/bonus token
    count: torch.Tensor  # [B] emitted tokens (= accepted + 1)
    path: torch.Tensor  # [B, D] verify indices of the accepted nodes in order (0-padded)
    on_path: torch.Tensor  # [B, T] bool: node accepted (the root always)


def walk(vt: VerifyTree, choose: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
         max_depth: int) -> Acceptance:
    """choose(rows [M], nodes [M], level) -> the target's tokens [M] at those verify nodes; called once per level
    for the rows still walking, so the target's token is computed only where the walk arrives."""
    B = vt.tokens.shape[0]
    dev = vt.tokens.device
    bidx = torch.arange(B, device=dev)
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    n_acc = torch.zeros(B, dtype=torch.long, device=dev)
    out_tok = torch.zeros(B, max_depth + 1, dtype=torch.long, device=dev)
    path = torch.zeros(B, max(max_depth, 1), dtype=torch.long, device=dev)
    on_path = torch.zeros_like(vt.valid)
    on_path[:, 0] = True
    rows = bidx
    for level in range(max_depth + 1):
        node = cur[rows]
        tok = choose(rows, node, level)  # [M]
        out_tok[rows, level] = tok
        if level == max_depth:
            break
        ch = vt.children[rows, node]  # [M, K]
        hit = (ch >= 0) & (vt.tokens[rows].gather(1, ch.clamp(min=0)) == tok[:, None])
        moved = hit.any(dim=1)
        rows, child = rows[moved], ch[moved].gather(1, hit[moved].to(torch.int8).argmax(dim=1, keepdim=True))[:, 0]
        if rows.numel() == 0:
            break
        path[rows, level] = child
        on_path[rows, child] = True
        n_acc[rows] += 1
        cur[rows] = child
    return Acceptance(out_tok, n_acc + 1, path, on_path)
