"""The K/V cache of one model, in one of two layouts behind one interface (write, read a layer for attention,
move columns, export and import a row's positions):
- `KVCache`: dense, one row of max_len + scratch columns per slot (attention reads a view);
- `PagedKVCache`: blocks from a pool, mapped per row by a block table (`drafting.runtime.blocks`): memory in
  proportion to the tokens held (attention reads the row's blocks gathered)."""
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
    def has_features(self) -> bool:
        return self.feat is not None

    def layer(self, li: int, rows: slice, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer for attention: [B, Hkv, kv_len, D] views."""
        return self.k[li, rows, :, :kv_len], self.v[li, rows, :, :kv_len]

    def pages(self, li: int, rows: slice) -> None:
        """Dense rows have no page table."""
        return None

    def features_at(self, rows: slice, pos: torch.Tensor) -> torch.Tensor:
        """Features [B, W, H] at positions pos [B, W] of rows `rows`."""
        f = self.feat[0, rows, 0]  # [B, columns, H]
        return f.gather(1, pos[..., None].expand(*pos.shape, f.shape[-1]))

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


class PagedKVCache:
    """K/V in blocks of `block` positions: k, v [L, blocks + 1, block, Hkv, D] (block 0: the trash block), row r's
    position p at block table[r, p // block], offset p % block. The table is the pool's (`BlockPool`), shared by
    every model of the engine. Positions as in `KVCache`: committed, then a step's tree nodes, and a trash position
    (columns - 1) that padding writes to."""

    def __init__(self, layers: int, kv_heads: int, max_len: int, head_dim: int, device, dtype, scratch: int,
                 features: int, table: torch.Tensor, blocks: int, block: int):
        self.block, self.table = block, table
        shape = (layers, blocks + 1, block, kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # zeros: masked keys still enter the matmul
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.feat = torch.zeros(1, blocks + 1, block, 1, features, device=device, dtype=dtype) if features else None
        self.max_len, self.scratch = max_len, scratch
        self.columns = max_len + scratch + 1
        self.trash = self.columns - 1

    @property
    def has_features(self) -> bool:
        return self.feat is not None

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.k, self.v) if self.feat is None else (self.k, self.v, self.feat)

    def _where(self, rows: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) of same-shape rows and positions; the trash position goes to the trash block."""
        blk = self.table[rows, (pos // self.block).clamp(max=self.table.shape[1] - 1)]
        return torch.where(pos >= self.trash, 0, blk), pos % self.block

    def write(self, layer: int, rows: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        blk, off = self._where(rows, pos)
        self.k[layer, blk, off] = k  # [.., Hkv, D]
        self.v[layer, blk, off] = v

    def write_features(self, rows: torch.Tensor, pos: torch.Tensor, h: torch.Tensor) -> None:
        blk, off = self._where(rows, pos)
        self.feat[0, blk, off, 0] = h

    def layer(self, li: int, rows: slice, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer for attention: the rows' first blocks gathered, [B, Hkv, kv_len, D]."""
        nb = -(-kv_len // self.block)
        blocks = self.table[rows, :nb]  # [B, nb]
        B = blocks.shape[0]

        def gather(t: torch.Tensor) -> torch.Tensor:  # index_select: about twice as fast as indexing on CPU
            g = t[li].index_select(0, blocks.reshape(-1)).view(B, nb * self.block, *t.shape[3:])  # [B, S, Hkv, D]
            return g[:, :kv_len].transpose(1, 2)

        return gather(self.k), gather(self.v)

    def pages(self, li: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer's pools [blocks + 1, block, Hkv, D] and the rows' block tables, for a kernel that reads
        through the table in place (no gather)."""
        return self.k[li], self.v[li], self.table[rows]

    def features_at(self, rows: slice, pos: torch.Tensor) -> torch.Tensor:
        row_idx = torch.arange(rows.start, rows.stop, device=pos.device)[:, None].expand_as(pos)
        blk, off = self._where(row_idx, pos)
        return self.feat[0, blk, off, 0]  # [B, W, H]

    def move_columns(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """All layers: positions src [B, J] of each row to dst [B, J]; the source is gathered before any write."""
        rows = rows.expand_as(src)
        sb, so = self._where(rows, src)
        db, do = self._where(rows, dst)
        for t in self.tensors:
            t[:, db, do] = t[:, sb, so]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Nothing to copy: the pool moves the row's table entries (`BlockPool.move`)."""

    def _span(self, row: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, end, device=self.table.device)
        return self._where(torch.full_like(pos, row), pos)

    def read(self, row: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of positions [start, end) of one row: [L, Hkv, end - start, D] each (the dense layout's)."""
        blk, off = self._span(row, start, end)
        return self.k[:, blk, off].transpose(1, 2).contiguous(), self.v[:, blk, off].transpose(1, 2).contiguous()

    def read_features(self, row: int, start: int, end: int) -> torch.Tensor | None:
        if self.feat is None:
            return None
        blk, off = self._span(row, start, end)
        return self.feat[:, blk, off].permute(0, 2, 1, 3).contiguous()  # [1, 1, n, H]

    def load(self, row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write [L, Hkv, n, D] tensors into positions [start, start + n) of one row (its blocks must exist)."""
        n = k.shape[2]
        if start + n > self.max_len:
            raise ValueError(f"KV range [{start}, {start + n}) exceeds max_len={self.max_len}")
        if k.shape[:2] != (self.k.shape[0], self.k.shape[3]) or k.shape[3] != self.k.shape[4]:
            raise ValueError(f"KV shape {tuple(k.shape)} does not fit this cache [L, Hkv, n, D] = "
                             f"[{self.k.shape[0]}, {self.k.shape[3]}, n, {self.k.shape[4]}]")
        blk, off = self._span(row, start, start + n)
        self.k[:, blk, off] = k.transpose(1, 2).to(self.k.device, self.k.dtype)
        self.v[:, blk, off] = v.transpose(1, 2).to(self.v.device, self.v.dtype)

    def load_features(self, row: int, start: int, h: torch.Tensor) -> None:
        if h.shape[:2] != (1, 1) or h.shape[3] != self.feat.shape[4] or start + h.shape[2] > self.max_len:
            raise ValueError(f"features of shape {tuple(h.shape)} at {start} do not fit this cache "
                             f"[1, 1, n <= {self.max_len - start}, {self.feat.shape[4]}]")
        blk, off = self._span(row, start, start + h.shape[2])
        self.feat[:, blk, off] = h.permute(0, 2, 1, 3).to(self.feat.device, self.feat.dtype)

    def copy_block(self, src: int, dst: int) -> None:
        """Block dst becomes a copy of block src in every tensor (copy-on-write of a shared prompt's last block)."""
        for t in self.tensors:
            t[:, dst] = t[:, src]
