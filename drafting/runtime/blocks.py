"""Which K/V blocks each row holds: one pool of block ids and one block table for every model of the engine.

The target's and the draft's caches (and a head's features) index the same token positions, so one table maps a
row's positions to blocks in all of them: row r's position p lives in block table[r, p // block] of each model's
own pool. Block 0 is the trash block (padding writes there; unallocated table entries point there and are read
only under a mask). A block may be shared by several rows (a request group's prompt): it is freed when the last
row holding it lets go. The table is a static device buffer, so captured graphs read it in place; the host keeps
the same lists and writes a row's table when its blocks change."""
from __future__ import annotations

import numpy as np
import torch


class BlockPool:
    """`blocks` allocatable blocks (ids 1..blocks) of `block` positions, for `slots` rows of `width` entries."""

    def __init__(self, blocks: int, block: int, slots: int, width: int, device: torch.device):
        if blocks < 1:
            raise ValueError(f"K/V pool: {blocks} blocks: at least one is needed")
        self.block, self.blocks, self.width = block, blocks, width
        self.free = list(range(blocks, 0, -1))  # a stack: the lowest ids go first
        self.refs = np.zeros(blocks + 1, dtype=np.int64)
        self.rows: list[list[int]] = [[] for _ in range(slots)]
        self.table = torch.zeros(slots, width, dtype=torch.long, device=device)
        self.peak_used = 0

    @property
    def used(self) -> int:
        return self.blocks - len(self.free)

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block)

    def covered(self, row: int) -> int:
        """Positions [0, covered) of the row have blocks."""
        return len(self.rows[row]) * self.block

    def grow(self, row: int, positions: int, held: list[int] | None = None) -> bool:
        """Blocks for the row's positions [0, positions) (at most the table's width), first from `held` (blocks
        `take` set aside for it: they pass to the row as they are), then from the pool; False, and nothing taken,
        when there are too few."""
        need = min(self.blocks_for(positions), self.width) - len(self.rows[row])
        if need <= 0:
            return True
        held = held if held is not None else []
        if need > len(self.free) + len(held):
            return False
        new = [held.pop() for _ in range(min(need, len(held)))]
        fresh = [self.free.pop() for _ in range(need - len(new))]
        self.refs[fresh] += 1
        self.rows[row] += new + fresh
        self.peak_used = max(self.peak_used, self.used)
        self._write(row)
        return True

    def take(self, n: int) -> list[int] | None:
        """n free blocks set aside, in no row (a reservation: admission and growth cannot have them until they are
        given back or a row's `grow` takes them); None, and nothing taken, when fewer are free."""
        if n > len(self.free):
            return None
        new = [self.free.pop() for _ in range(n)]
        self.refs[new] += 1
        self.peak_used = max(self.peak_used, self.used)
        return new

    def hold(self, blocks: list[int]) -> None:
        """One more reference on blocks some row holds (they stay when that row lets go)."""
        self.refs[blocks] += 1

    def give(self, blocks: list[int]) -> None:
        """Let go of references `take` or `hold` made; blocks nothing else holds go back to the pool."""
        self.refs[blocks] -= 1
        self.free += [b for b in reversed(blocks) if self.refs[b] == 0]

    def share(self, row: int, blocks: list[int]) -> None:
        """The row (holding nothing yet) starts with these blocks of another row: a shared prefix."""
        assert not self.rows[row], "share into an empty row only"
        self.refs[blocks] += 1
        self.rows[row] = list(blocks)
        self._write(row)

    def release(self, row: int) -> None:
        """The row lets go of its blocks; those no other row holds go back to the pool."""
        held = self.rows[row]
        self.refs[held] -= 1
        self.free += [b for b in reversed(held) if self.refs[b] == 0]
        self.rows[row] = []
        self.table[row] = 0

    def move(self, src: int, dst: int) -> None:
        """Row dst (empty) takes row src's blocks: a row moved into a hole costs a table row, not a K/V copy."""
        self.rows[dst], self.rows[src] = self.rows[src], []
        self.table[dst] = self.table[src]
        self.table[src] = 0

    def _write(self, row: int) -> None:
        held = self.rows[row]
        entries = torch.zeros(self.width, dtype=torch.long)
        entries[:len(held)] = torch.tensor(held, dtype=torch.long)
        self.table[row] = entries.to(self.table.device, non_blocking=True)
