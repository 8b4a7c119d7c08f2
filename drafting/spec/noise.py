"""Position-keyed sampling: the randomness of a sampled token is a pure function of (request seed, absolute
position), so a seeded sample's tokens do not depend on the draft strategy, the batch, the instance or the
device (Gumbel-max after Daliri, Musco and Suresh, arXiv 2408.07978).

The token at position t is the Gumbel-max of the processed target distribution p_t under noise keyed by
(seed, t): exactly p_t-distributed, and what plain decoding with that seed emits. The draft ranks its
candidates under the same noise (coupled drafting), so a draft close to the target guesses the target's
token even where p_t is flat.

Large vocabularies use two-level Gumbel-max: first a block of `block` consecutive token ids by its mass, then
a token inside that block. Still exactly p_t-distributed, with noise for V / block blocks plus one block per
position instead of V values; for V <= SINGLE_LEVEL_MAX the whole vocabulary is one block (plain Gumbel-max).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from drafting.spec.sampling import _GOLDEN, mix64

SINGLE_LEVEL_MAX = 4096  # up to this vocabulary size, one noise value per token is cheap enough
_BLOCK_STREAM, _TOKEN_STREAM = 0x51ED27, 0x7A11E5


def block_size(vocab: int) -> int:
    """Tokens per noise block: the whole vocabulary when small, else about sqrt(V) (a power of two)."""
    if vocab <= SINGLE_LEVEL_MAX:
        return vocab
    return 1 << round(math.log2(math.sqrt(vocab)))


def position_keys(seed: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One 64-bit key per (seed, absolute token position); seed [N] or broadcastable, int64 -> [N] int64."""
    return mix64(mix64(seed) + _GOLDEN * (position + 1))


def gumbel(keys: torch.Tensor, index: torch.Tensor, stream: int) -> torch.Tensor:
    """Standard Gumbel noise G(key, index), float64: keys [N], index [M] or [N, M] int64 -> [N, M]."""
    base = mix64(keys + stream)[:, None]
    z = mix64(base + _GOLDEN * (index + 1))
    u = ((z >> 11) & ((1 << 53) - 1)).to(torch.float64).add_(0.5).mul_(1.0 / (1 << 53))  # (0, 1)
    return u.log_().neg_().log_().neg_()


def uniform(keys: torch.Tensor, stream: int = 0x0C0FFE) -> torch.Tensor:
    """One uniform in (0, 1) per key, float64 [N]."""
    z = mix64(keys + stream)
    return ((z >> 11) & ((1 << 53) - 1)).to(torch.float64).add_(0.5).mul_(1.0 / (1 << 53))


def _blocks(probs: torch.Tensor, block: int) -> torch.Tensor:
    """[N, V] -> [N, nb, block], the tail padded with zero mass."""
    N, V = probs.shape
    nb = -(-V // block)
    return F.pad(probs, (0, nb * block - V)).view(N, nb, block)


def gumbel_token(probs: torch.Tensor, keys: torch.Tensor, block: int) -> torch.Tensor:
    """The Gumbel-max token of each row: probs [N, V] (processed, zeros allowed), keys [N] -> [N] long."""
    N, V = probs.shape
    dev = probs.device
    if block >= V:
        return (probs.double().log() + gumbel(keys, torch.arange(V, device=dev), _TOKEN_STREAM)).argmax(-1)
    P = _blocks(probs, block)
    mass = P.sum(-1, dtype=torch.float64)  # [N, nb]
    c = (mass.log() + gumbel(keys, torch.arange(P.shape[1], device=dev), _BLOCK_STREAM)).argmax(-1)  # [N]
    idx = c[:, None] * block + torch.arange(block, device=dev)  # [N, block] token ids
    inside = P[torch.arange(N, device=dev), c].double().log() + gumbel(keys, idx, _TOKEN_STREAM)
    return c * block + inside.argmax(-1)


def coupled_candidates(probs: torch.Tensor, keys: torch.Tensor | None, k: int, block: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft's k best guesses of the target's noisy choice: probs [N, V] (the draft's processed
    distribution), keys [N] or None (greedy: no noise). Returns tokens [N, k] best first and their margins
    [N, k]: for the first, how far the runner-up is behind it; for the others, minus how far each is behind
    the first (in perturbed log-score). Margins are an acceptance-predictor feature."""
    N, V = probs.shape
    dev = probs.device
    k1 = min(k + 1, V)
    if keys is None:  # no noise: rank by probability itself, logs of the top few only (one pass over V)
        top, tok = probs.topk(k1, dim=-1)
        top = top.double().log()
        deficit = top[:, :1] - top  # [N, k1] >= 0, 0 for the best
    elif block >= V:
        score = probs.double().log() + gumbel(keys, torch.arange(V, device=dev), _TOKEN_STREAM)
        top, tok = score.topk(k1, dim=-1)
        deficit = top[:, :1] - top
    else:  # two levels: a candidate's deficit = its block's gap to the best block + its gap inside its block
        P = _blocks(probs, block)
        nb = P.shape[1]
        bscore = P.sum(-1, dtype=torch.float64).log() + gumbel(keys, torch.arange(nb, device=dev), _BLOCK_STREAM)
        kb = min(k1, nb)
        btop, bidx = bscore.topk(kb, dim=-1)  # [N, kb]
        idx = bidx[..., None] * block + torch.arange(block, device=dev)  # [N, kb, block]
        inner = (P.gather(1, bidx[..., None].expand(N, kb, block)).double().log()
                 + gumbel(keys, idx.view(N, -1), _TOKEN_STREAM).view(N, kb, block))
        kt = min(k1, block)
        itop, ipos = inner.topk(kt, dim=-1)  # [N, kb, kt]
        d = (btop[:, :1] - btop)[..., None] + (itop[..., :1] - itop)  # [N, kb, kt]
        deficit, order = d.view(N, -1).topk(min(k1, kb * kt), dim=-1, largest=False)
        tok = idx.gather(2, ipos).view(N, -1).gather(1, order)
    deficit = torch.where(torch.isfinite(deficit), deficit, torch.full_like(deficit, 1e3))
    margin = torch.cat([deficit[:, 1:2] if deficit.shape[1] > 1 else torch.full_like(deficit[:, :1], 1e3),
                        -deficit[:, 1:k]], dim=1)
    if tok.shape[1] < k:  # fewer candidates than k (tiny vocabulary): repeat the last, marked hopeless
        pad = k - tok.shape[1]
        tok = torch.cat([tok, tok[:, -1:].expand(N, pad)], dim=1)
        margin = torch.cat([margin, torch.full((N, pad), -1e3, dtype=margin.dtype, device=dev)], dim=1)
    return tok[:, :k], margin[:, :k].float()


class GumbelScheme:
    """How sampled rows draft and verify: children = the draft's best guesses under the position-keyed
    noise; the target's token at a node = its Gumbel-max. (bench.schemes holds the compared alternatives.)"""

    name = "gumbel"

    def candidates(self, probs: torch.Tensor, keys: torch.Tensor, k: int, block: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return coupled_candidates(probs, keys, k, block)

    def token(self, probs: torch.Tensor, keys: torch.Tensor, children: torch.Tensor | None, block: int
              ) -> torch.Tensor:
        """children [M, K] (-1 = none): the drafted candidates at the node; the Gumbel-max ignores them."""
        return gumbel_token(probs, keys, block)
