"""Which cache columns a query may attend to: the rule every attention backend follows (SDPA takes it as a mask,
the Triton kernel computes it in place and tests itself against it)."""
from __future__ import annotations

import torch


def visible(prefix: torch.Tensor, tail: torch.Tensor | None, T: int, kv_len: int) -> torch.Tensor:
    """[B, T, kv_len] bool: the columns each query sees (see the module docstring)."""
    j = torch.arange(kv_len, device=prefix.device)
    mask = (j[None, :] < prefix[:, None])[:, None, :].expand(-1, T, -1)  # [B, T, S]
    if tail is None or tail.shape[-1] == 0:
        return mask
    Tt = tail.shape[-1]
    rel = j[None, :] - prefix[:, None]  # [B, S]
    inside = (rel >= 0) & (rel < Tt)
    bits = tail.gather(2, rel.clamp(0, Tt - 1)[:, None, :].expand(-1, T, -1))  # [B, T, S]
    return mask | (bits & inside[:, None, :])
