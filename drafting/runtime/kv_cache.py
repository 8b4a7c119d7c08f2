"""Per-slot KV cache of one model: live samples sit densely in rows 0..B-1, so attention reads a view."""
from __future__ import annotations

import torch


class KVCache:
    """Preallocated K/V [L, slots, Hkv, max_len + scratch + 1, D].

    Columns [0, max_len) hold committed tokens; a step's new tokens (tree nodes) are written right after a row's
    committed ones, into columns that reach at most `scratch` past max_len; the last column is a trash column
    where padded tokens of a ragged batch write, never read.

    features > 0 (the target's cache when the draft is a head, `drafting.head`): also the model's final hidden
    state per column, feat [1, slots, 1, columns, features], laid out like one layer of K so that every copy,
    move and export below treats it as one more KV tensor."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, device, dtype,
                 scratch: int = 0, features: int = 0):
        shape = (layers, slots, kv_heads, max_len + scratch + 1, head_dim)
        # zeros, not empty: masked-out keys still enter the attention matmul and must be finite
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.feat = (torch.zeros(1, slots, 1, shape[3], features, device=device, dtype=dtype) if features
                     else None)
        self.max_len, self.scratch = max_len, scratch
        self.columns = shape[3]
        self.trash = self.columns - 1

    def write(self, layer: int, rows: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """rows, pos: same-shape index tensors ([B, T], or [N] packed); k, v [.., Hkv, D] to match."""
        self.k[layer, rows, :, pos] = k  # the indexed view is [.., Hkv, D]
        self.v[layer, rows, :, pos] = v

    def write_features(self, rows: torch.Tensor, pos: torch.Tensor, h: torch.Tensor) -> None:
        """rows, pos: same-shape index tensors; h [.., H] to match."""
        self.feat[0, rows, 0, pos] = h

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.k, self.v) if self.feat is None else (self.k, self.v, self.feat)

    def move_columns(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """All layers: columns src [B, J] of each row to dst [B, J] (e.g. accepted tree nodes to their committed
        places). The source is gathered before anything is written."""
        for t in self.tensors:
            t[:, rows, :, dst] = t[:, rows, :, src]  # [B, J, L, Hkv, D]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` columns of row src into row dst (fills the hole a removed sample left)."""
        for t in self.tensors:
            t[:, dst, :, :length] = t[:, src, :, :length]

    def read(self, row: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of positions [start, end) of one row: [L, Hkv, end - start, D] each."""
        return self.k[:, row, :, start:end].clone(), self.v[:, row, :, start:end].clone()

    def read_features(self, row: int, start: int, end: int) -> torch.Tensor | None:
        """Copy of positions [start, end) of one row's features [1, 1, end - start, H] (None without features)."""
        return None if self.feat is None else self.feat[:, row, :, start:end].clone()

    def load_features(self, row: int, start: int, h: torch.Tensor) -> None:
        """Write [1, 1, n, H] features into positions [start, start + n) of one row."""
        if h.shape[:2] != (1, 1) or h.shape[3] != self.feat.shape[4] or start + h.shape[2] > self.max_len:
            raise ValueError(f"features of shape {tuple(h.shape)} at {start} do not fit this cache "
                             f"[1, 1, n <= {self.max_len - start}, {self.feat.shape[4]}]")
        self.feat[:, row, :, start:start + h.shape[2]] = h.to(self.feat.device, self.feat.dtype)

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
