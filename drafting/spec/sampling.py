"""Logits processing (as HF `generate` does it), the splitmix64 mixer behind every random draw, and
inverse-CDF sampling. Draws are pure functions of integer keys (`drafting.noise`): the same on any device."""
from __future__ import annotations

import torch


def _i64(x: int) -> int:
    """Unsigned 64-bit constant as the signed int64 torch stores."""
    return x - (1 << 64) if x >= (1 << 63) else x


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_M1 = _i64(0xBF58476D1CE4E5B9)
_M2 = _i64(0x94D049BB133111EB)


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift on int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (multiplication wraps mod 2^64)."""
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def as_int64(x: int) -> int:
    """Any Python int folded into the int64 range (seeds are stored in int64 tensors)."""
    return ((int(x) + (1 << 63)) % (1 << 64)) - (1 << 63)


def derive_seed(seed: int, index: int) -> int:
    """A distinct, reproducible seed per prompt from one user seed (so equal prompts don't sample equally)."""
    z = torch.tensor([as_int64(seed)]) + torch.tensor([_GOLDEN]) * (index + 1)
    return int(mix64(z).item())


def process_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   use_top_k: bool = True, use_top_p: bool = True) -> torch.Tensor:
    """Probabilities p after HF's warpers in HF's order: temperature, top-k, top-p.

    logits [N, V]; temperature [N] (0 = greedy: the raw softmax is returned), top_k [N] int (0 = off),
    top_p [N] float64 (1 = off). Returns float32 [N, V]."""
    V = logits.shape[-1]
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).to(torch.float32)
    scores = logits.float() / t[:, None]
    if use_top_k:
        k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
        kth = scores.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if use_top_p:
        sorted_logits, sorted_idx = scores.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1.0 - top_p).to(torch.float32)[:, None]
        remove[:, -1] = False  # min_tokens_to_keep = 1
        remove = remove.scatter(1, sorted_idx, remove)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores.softmax(dim=-1)


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [N, V] (unnormalised ok), u [N] in [0, 1) -> token ids [N].

    Never returns a zero-probability token."""
    cdf = probs.to(torch.float64).cumsum(dim=-1)  # [N, V]
    target = (u * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)  # [N]
    last_nonzero = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(dim=-1)
    return torch.minimum(idx, last_nonzero)  # guards u * total rounding up to total
