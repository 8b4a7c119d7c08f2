"""Attention over the K/V cache in place: every forward kind (prefill, plain, draft level, tree verify) reads
its keys where they live, described the same way per row:

    column j of row b is visible to query t  iff  j < prefix[b]  or  (u = j - prefix[b]) < Tt and tail[b, t, u]

prefix [B]: committed columns every query sees; tail [B, T, Tt] bool: the new tokens' own region right after
them (a causal block for prefill and catch-up, the ancestor mask of a draft or verify tree). New K/V are
written into the cache before attention, so committed K/V are never copied.

Backends: `sdpa` (torch's scaled_dot_product_attention over cache[:, :kv_len] with an explicit mask; the CPU
path, exact as before) and `triton` (drafting.triton_attention: reads each row only up to its own length,
GQA heads packed, split-K for small batches). A paged cache would keep the same description, with the row's
columns looked up in a page table."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from drafting.model.mask import visible

BACKENDS = ("auto", "sdpa", "triton")
_CUDA_SDPA = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def resolve_backend(name: str, device: torch.device, head_dim: int) -> str:
    """One model's backend. 'auto': the Triton kernel on CUDA when Triton imports, else SDPA. The Triton kernel
    serves the head sizes it was built for; a model with another falls back to SDPA."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}: want one of {BACKENDS}")
    if name == "sdpa" or (name == "auto" and device.type != "cuda"):
        return "sdpa"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("attention backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1, for tests)")
    try:
        from drafting.model.triton_attention import HEAD_DIMS
    except ImportError as e:
        if name == "triton":
            raise ValueError(f"attention backend 'triton': {e}") from None
        return "sdpa"
    return "triton" if head_dim in HEAD_DIMS else "sdpa"


class Attention:
    """One forward's attention: the mask (SDPA) is built once and serves every layer."""

    def __init__(self, backend: str, prefix: torch.Tensor, tail: torch.Tensor | None, T: int, kv_len: int,
                 heads: int, kv_heads: int):
        self.backend, self.prefix, self.tail, self.kv_len = backend, prefix, tail, kv_len
        self.group = heads // kv_heads
        self.mask = None
        if backend == "sdpa":
            mask = visible(prefix, tail, T, kv_len)[:, None]  # [B, 1, T, S]
            if prefix.device.type == "cuda" and self.group > 1:
                # GQA folded into the query axis: [B, Hkv, G * T, D] queries against unrepeated K/V (the mask
                # repeats per group), so every backend reads each K/V head once
                mask = mask.repeat(1, 1, self.group, 1)
            self.mask = mask

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 table: torch.Tensor | None = None) -> torch.Tensor:
        """q [B, Hq, T, D]; k_cache, v_cache [rows, Hkv, P, D] (this forward's rows of one layer) -> [B, Hq, T, D].
        With `table` (Triton only): one layer's page pool [pages, PAGE, Hkv, D], read through the rows' page table."""
        if self.backend == "triton":
            from drafting.model.triton_attention import tree_attention

            return tree_attention(q, k_cache, v_cache, self.prefix, self.tail, self.kv_len, table=table)
        keys, vals = k_cache[:, :, :self.kv_len], v_cache[:, :, :self.kv_len]
        if q.device.type != "cuda":
            return F.scaled_dot_product_attention(q, keys, vals, attn_mask=self.mask, enable_gqa=self.group > 1)
        B, H, T, D = q.shape
        with sdpa_kernel(_CUDA_SDPA):  # cuDNN's path costs ~200 ms of host time per step at these shapes
            out = F.scaled_dot_product_attention(q.reshape(B, H // self.group, self.group * T, D), keys, vals,
                                                 attn_mask=self.mask)
        return out.reshape(B, H, T, D)
