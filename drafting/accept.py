"""Lossless acceptance of a verified draft tree, vectorised over the batch (a loop over depth only).

Greedy: follow the child equal to the target argmax; the bonus is the argmax where the walk stops.
Sampling: at a node, children x1..xk (point-mass proposals) are tried in draft order; xi is accepted with
probability r(xi), r = the target's processed p at the node with the rejected children zeroed and
renormalised; if all are rejected the correction token is drawn from the final residual (= p at a leaf).
Every emitted token is then exactly p-distributed."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from drafting.sampling import sample_from, uniforms
from drafting.tree import VerifyTree


@dataclass
class Acceptance:
    tokens: torch.Tensor  # [B, D + 1] accepted draft tokens then the correction/bonus token
    logprobs: torch.Tensor  # [B, D + 1] log p of those tokens under the processed target distribution
    count: torch.Tensor  # [B] emitted tokens (= accepted + 1)
    path: torch.Tensor  # [B, D] verify indices of the accepted nodes in order (0-padded)
    on_path: torch.Tensor  # [B, T] bool: node accepted


def accept(vt: VerifyTree, logits: torch.Tensor, probs: torch.Tensor, greedy: torch.Tensor, seed: torch.Tensor,
           counter: torch.Tensor, max_depth: int) -> Acceptance:
    """logits, probs [B, T, V] at every verify node (probs = processed p); greedy, seed, counter [B]."""
    B, T, V = probs.shape
    K = vt.children.shape[2]
    dev = probs.device
    bidx = torch.arange(B, device=dev)
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    n_acc = torch.zeros(B, dtype=torch.long, device=dev)
    out_tok = torch.zeros(B, max_depth + 1, dtype=torch.long, device=dev)
    out_lp = torch.zeros(B, max_depth + 1, dtype=torch.float32, device=dev)
    path = torch.zeros(B, max(max_depth, 1), dtype=torch.long, device=dev)
    on_path = torch.zeros(B, T, dtype=torch.bool, device=dev)
    on_path[:, 0] = True
    # every draw this step may need, at once: level l uses draw indices l * (K + 1) + [0, K]
    u_all = uniforms(seed, counter, torch.arange((max_depth + 1) * (K + 1), device=dev)).view(B, max_depth + 1, K + 1)
    for level in range(max_depth + 1):
        ch = vt.children[bidx, cur]  # [B, K]
        ch_ok = ch >= 0
        ch_tok = vt.tokens.gather(1, ch.clamp(min=0))  # [B, K]
        p = probs[bidx, cur]  # [B, V]
        g = logits[bidx, cur].argmax(dim=-1)  # [B]
        # sequential residual test of each child, done at once: r_j(x_j) = p(x_j) / (1 - sum_{i<j} p(x_i))
        pj = p.gather(1, ch_tok) * ch_ok  # [B, K]
        ratio = pj / (1.0 - (pj.cumsum(dim=1) - pj)).clamp(min=1e-30)
        u = u_all[:, level]  # [B, K + 1]
        hit = torch.where(greedy[:, None], ch_ok & (ch_tok == g[:, None]), ch_ok & (u[:, :K] < ratio))
        any_hit = hit.any(dim=1)
        first = hit.to(torch.int8).argmax(dim=1)  # first accepted child
        # correction (all rejected) or bonus (no children): the residual with tried children removed
        tried = torch.zeros(B, V + 1, dtype=torch.bool, device=dev).scatter_(
            1, torch.where(ch_ok, ch_tok, V), True)[:, :V]  # absent children mark the spare column V
        resid = p.masked_fill(tried, 0.0)
        resid = torch.where(resid.sum(dim=1, keepdim=True) > 0, resid, p)
        final = torch.where(greedy, g, sample_from(resid, u[:, K]))
        moved = active & any_hit
        node = ch.gather(1, first[:, None]).squeeze(1)
        tok = torch.where(moved, ch_tok.gather(1, first[:, None]).squeeze(1), final)
        out_tok[:, level] = torch.where(active, tok, out_tok[:, level])
        out_lp[:, level] = torch.where(active, p.gather(1, tok[:, None]).squeeze(1).log(), out_lp[:, level])
        if level < max_depth:
            path[:, level] = torch.where(moved, node, path[:, level])
        on_path[bidx, torch.where(moved, node, torch.zeros_like(node))] |= moved
        n_acc += moved.long()
        cur = torch.where(moved, node, cur)
        active = moved
        if not bool(active.any()):
            break
    return Acceptance(out_tok, out_lp, n_acc + 1, path, on_path)
