"""What a row's K/V costs, in the cache's own terms: `DenseMemory` (a slot is a whole row of max_len columns, so
only slots count) or `PagedMemory` (blocks from a pool: a sample holds blocks for the positions it has, a request
group shares its prompt's full blocks, and a step's tree scratch lives in a row's tail blocks). `Slots` asks the
same questions of either: can this request come in, cover this row's positions, how many tree nodes fit."""
from __future__ import annotations

from drafting.runtime.blocks import BlockPool


class DenseMemory:
    """Every slot owns max_len + scratch columns: admission is by slots alone."""

    sharing = False
    block = 0  # no blocks: migration reserves slots only

    def __init__(self, scratch: int):
        self.scratch = scratch

    def admit_cost(self, prompt_len: int, shared: bool) -> int:
        return 0

    def affordable(self, blocks: int, reserve: bool = True) -> bool:
        return True

    def claim(self, row: int, positions: int, held: list[int] | None = None) -> bool:
        return True

    def full_blocks(self, prompt_len: int) -> int:
        return 0

    def blocks_for(self, positions: int) -> int:
        return 0

    def free_blocks(self) -> int:
        return 0

    def take(self, blocks: int, reserve: bool = True) -> list[int] | None:
        return []

    def hold(self, blocks: list[int]) -> None:
        pass

    def give(self, blocks: list[int]) -> None:
        pass

    def node_cap(self, rows_n, want: int) -> int:
        return self.scratch - 1

    def release(self, row: int) -> None:
        pass

    def move(self, src: int, dst: int) -> None:
        pass

    def stats(self) -> dict:
        return {}


class PagedMemory:
    """Rows' positions in blocks of `pool`, for the caches that share its table. `watermark`: the share of the pool
    admission leaves free, so that running samples can grow a while before anything is preempted."""

    def __init__(self, pool: BlockPool, caches, sharing: bool = True, watermark: float = 0.01):
        self.pool, self.caches, self.sharing = pool, [c for c in caches if c is not None], sharing
        self.reserve = max(1, int(watermark * pool.blocks))
        self.block = pool.block

    def admit_cost(self, prompt_len: int, shared: bool) -> int:
        """Blocks a new sample needs for its prompt and its first write (position prompt_len - 1); a sibling of a
        live prompt only its own copy of the last, partial block."""
        return 1 if shared else self.pool.blocks_for(prompt_len)

    def affordable(self, blocks: int, reserve: bool = True) -> bool:
        """Whether `blocks` more leave the reserve free (with nothing running, the reserve is not needed)."""
        return blocks <= len(self.pool.free) - (self.reserve if reserve else 0)

    def claim(self, row: int, positions: int, held: list[int] | None = None) -> bool:
        """Blocks for the row's positions [0, positions): from `held` (a reservation's) first, then the pool."""
        return self.pool.grow(row, positions, held)

    def full_blocks(self, prompt_len: int) -> int:
        """The prompt's blocks a sibling shares (K/V of positions [0, prompt_len - 1) in whole blocks); 0 when
        prompts are not shared."""
        return (prompt_len - 1) // self.pool.block if self.sharing else 0

    def blocks_for(self, positions: int) -> int:
        return self.pool.blocks_for(positions)

    def free_blocks(self) -> int:
        return len(self.pool.free)

    def blocks_of(self, row: int) -> list[int]:
        return self.pool.rows[row]

    def share_blocks(self, row: int, blocks: list[int]) -> None:
        """The (empty) row starts with these blocks, held by another row or a reservation (a shared prefix)."""
        self.pool.share(row, blocks)

    def take(self, blocks: int, reserve: bool = True) -> list[int] | None:
        """Set `blocks` free blocks aside (a migration's reservation), leaving the pool's reserve free; None, and
        nothing taken, when they are not affordable."""
        return self.pool.take(blocks) if self.affordable(blocks, reserve) else None

    def hold(self, blocks: list[int]) -> None:
        self.pool.hold(blocks)

    def give(self, blocks: list[int]) -> None:
        self.pool.give(blocks)

    def share(self, row: int, holder: int, prompt_len: int) -> None:
        """Row takes the holder's full prompt blocks (its K/V of positions [0, prompt_len - 1)) and a copy of the
        block holding the prompt's last positions, where it will write its own tokens (copy-on-write)."""
        full = (prompt_len - 1) // self.pool.block
        self.pool.share(row, self.pool.rows[holder][:full])
        if not self.pool.grow(row, prompt_len):
            raise RuntimeError("K/V pool: no block for a shared prompt's tail (admission should have counted it)")
        if (prompt_len - 1) % self.pool.block:
            src, dst = self.pool.rows[holder][full], self.pool.rows[row][full]
            for cache in self.caches:
                cache.copy_block(src, dst)

    def node_cap(self, rows_n, want: int) -> int:
        """Grow each row (n committed tokens) toward room for `want` tree nodes past n, as the pool allows; the
        tree nodes every row has room for."""
        if want == 0:  # a plain step: its one position per row is claimed already
            return 0
        cap = want
        for row, n in enumerate(rows_n):
            self.pool.grow(row, int(n) + want) or self.pool.grow(row, int(n) + min(cap, want))
            cap = min(cap, self.pool.covered(row) - int(n))
        return max(cap, 0)

    def release(self, row: int) -> None:
        self.pool.release(row)

    def move(self, src: int, dst: int) -> None:
        self.pool.move(src, dst)

    def stats(self) -> dict:
        p = self.pool
        return {"kv_blocks": p.blocks, "kv_blocks_used": p.used, "kv_blocks_peak": p.peak_used, "kv_block": p.block}
