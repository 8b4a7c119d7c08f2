"""Per-slot KV cache of one model: live samples sit densely in rows 0..B-1, so attention reads a view."""
from __future__ import annotations

import torch


class KVCache:
    """Preallocated K/V [L, slots, Hkv, max_len + 1, D].

    Column max_len is a trash column: padded tokens of a ragged batch write there and it is never read."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (layers, slots, kv_heads, max_len + 1, head_dim)
        # zeros, not empty: masked-out keys still enter the attention matmul and must be finite
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.trash = max_len

    def write(self, layer: int, rows: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """rows, pos [B, T] long; k, v [B, Hkv, T, D]."""
        self.k[layer, rows, :, pos] = k.transpose(1, 2)  # indexed result is [B, T, Hkv, D]
        self.v[layer, rows, :, pos] = v.transpose(1, 2)

    def write_all_layers(self, rows: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """rows, pos [B, T] long; k, v [L, B, Hkv, T, D]."""
        self.k[:, rows, :, pos] = k.permute(1, 3, 0, 2, 4)  # indexed result is [B, T, L, Hkv, D]
        self.v[:, rows, :, pos] = v.permute(1, 3, 0, 2, 4)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` columns of row src into row dst (fills the hole a removed sample left)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def read(self, row: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of positions [start, end) of one row: [L, Hkv, end - start, D] each."""
        return self.k[:, row, :, start:end].clone(), self.v[:, row, :, start:end].clone()

    def load(self, row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write [L, Hkv, n, D] tensors into positions [start, start + n) of one row."""
        n = k.shape[2]
        if start + n > self.max_len:
            raise ValueError(f"KV range [{start}, {start + n}) exceeds max_len={self.max_len}")
        if k.shape[:2] != self.k.shape[:1] + self.k.shape[2:3] or k.shape[3] != self.k.shape[4]:
            raise ValueError(f"KV shape {tuple(k.shape)} does not fit this cache [L, Hkv, n, D] = "
                             f"[{self.k.shape[0]}, {self.k.shape[2]}, n, {self.k.shape[4]}]")
        self.k[:, row, :, start:start + n] = k.to(self.k.device, self.k.dtype)
        self.v[:, row, :, start:start + n] = v.to(self.v.device, self.v.dtype)
