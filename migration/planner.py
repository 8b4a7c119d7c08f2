"""Reallocation policy (pure, no Ray): from the instances' loads, a saturation threshold and a cooldown, pair
overloaded instances with under-used ones and emit migration orders.

An instance is overloaded when it holds more samples (live + queued) than its saturation threshold: past that
point its throughput no longer grows, so extra samples only wait. It is under-used when it decodes fewer live
samples than the threshold and has nothing queued. The most loaded source pairs with the least loaded
destination, the next with the next, and each move evens the pair out."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Iterable, Mapping, Union

Threshold = Union[int, str]  # a live-sample count, or "auto": the profiled saturation point


@dataclass
class SampleLoad:
    """One running sample as the planner sees it."""

    request_id: Hashable
    kv_tokens: int  # committed KV positions a move copies
    generated: int
    max_new_tokens: int

    @property
    def remaining(self) -> int:
        """Tokens that may still come: the budget left (no length model is assumed)."""
        return max(self.max_new_tokens - self.generated, 0)


@dataclass
class InstanceLoad:
    """What a generation instance reports to the load balancer on each poll."""

    index: int
    live: int
    queued: int
    max_slots: int
    reserved: int = 0  # slots held for incoming migrations
    kv_tokens: int = 0  # committed KV positions of all live samples
    tokens_per_s: float = 0.0  # committed tokens per second over the recent window
    saturation_live: int | None = None  # from the engine's calibration, when it has one
    samples: list[SampleLoad] = field(default_factory=list)  # running samples
    queued_ids: list = field(default_factory=list)  # in admission (FIFO) order
    kv_capacity: int = 0  # token positions a paged K/V pool holds (0: dense rows, the slots bound the samples)
    kv_free: int = 0  # of which free now

    @property
    def load(self) -> int:
        return self.live + self.queued

    @property
    def pool_bound(self) -> int | None:
        """Live samples the paged pool holds at the live ones' mean tokens (None: dense, or nothing live)."""
        if not self.kv_capacity or not self.live:
            return None
        return max(1, self.kv_capacity * self.live // max(self.kv_tokens, 1))

    def room(self, tokens_each: int) -> int:
        """Samples of `tokens_each` K/V tokens it can take now: free slots, and free pool tokens when paged."""
        slots = self.max_slots - self.live - self.reserved
        return slots if not self.kv_capacity else min(slots, self.kv_free // max(tokens_each, 1))


@dataclass
class MigrationOrder:
    source: int
    destination: int
    request_ids: list
    reason: str
    kind: str = "running"  # "queued": requests not yet admitted, nothing to copy | "running": KV migration
    order_id: int = 0


def resolve_threshold(setting: Threshold, load: InstanceLoad) -> tuple[int, str]:
    """(threshold, where it came from) for one instance, in live samples. `auto` reads the profiled saturation
    point (at most max_slots); without a calibration it falls back to half the slots (on this CPU the tiny actor's
    plain-decoding throughput stops growing near 32 of 64 live samples). A paged K/V pool bounds it too: a full
    pool is a full instance, however few its samples. A number is taken as it is."""
    if setting != "auto":
        return int(setting), "configured"
    if load.saturation_live:  # an instance never runs more than max_slots: past that it has saturated anyway
        value, source = min(int(load.saturation_live), load.max_slots), "profiled saturation point"
    else:
        value, source = max(1, load.max_slots // 2), "default max_slots // 2 (engine has no saturation point)"
    bound = load.pool_bound
    if bound is not None and bound < value:
        return bound, f"K/V pool occupancy ({load.kv_tokens} of {load.kv_capacity} tokens held by {load.live})"
    return value, source


def rank_running(samples: Iterable[SampleLoad]) -> list[SampleLoad]:
    """Running samples in the order they should leave: most tokens still to come per KV token moved first
    (a move buys future decoding and costs its KV copy); samples with nothing left to decode never move."""
    alive = [s for s in samples if s.remaining > 0]
    return sorted(alive, key=lambda s: -s.remaining / max(s.kv_tokens, 1))


def plan(loads: Iterable[InstanceLoad], thresholds: Mapping[int, int], now: float, cooldown_s: float,
         last_order: Mapping[int, float], excluded: Iterable[int] = ()) -> list[MigrationOrder]:
    """Orders for one balancing round. `last_order[i]` is when instance i last took part in an order; it sits
    out until `cooldown_s` have passed, so samples do not bounce. Queued requests move first (no KV to copy),
    then running samples, never more than the destination has free slots."""
    skip = set(excluded)
    ready = [ld for ld in loads if ld.index not in skip and now - last_order.get(ld.index, float("-inf")) >= cooldown_s]
    thr = {ld.index: thresholds[ld.index] for ld in ready}
    sources = sorted((ld for ld in ready if ld.load > thr[ld.index]), key=lambda ld: (-ld.load, ld.index))
    dests = sorted((ld for ld in ready if ld.queued == 0 and ld.live + ld.reserved < thr[ld.index]),
                   key=lambda ld: (ld.live + ld.reserved, ld.index))
    orders = []
    for src, dst in zip(sources, dests):
        held = dst.live + dst.reserved
        k = min(src.load - thr[src.index], (src.load - held) // 2)  # never below the threshold; even the pair
        if k <= 0:
            continue
        why = (f"instance {src.index} holds {src.live} live + {src.queued} queued > threshold {thr[src.index]} "
               f"({src.kv_tokens} KV tokens, {src.tokens_per_s:.0f} tok/s); instance {dst.index} holds {dst.live} "
               f"live (+{dst.reserved} reserved) < threshold {thr[dst.index]} ({dst.tokens_per_s:.0f} tok/s); "
               f"moving {k} evens them out")
        # the back of the queue would start last here; moved into free slots only, they start at once there (a
        # request queued again at the destination would gain nothing and lose its place in line); a paged
        # destination takes what its pool has room for too
        free = dst.room(src.kv_tokens // max(src.live, 1))
        queued = list(reversed(src.queued_ids))[:min(k, free)]
        if queued:
            orders.append(MigrationOrder(src.index, dst.index, list(queued), why + f" ({len(queued)} queued)",
                                         "queued"))
        running = rank_running(src.samples)[:max(0, min(k, free) - len(queued))]
        if running:
            kv = sum(s.kv_tokens for s in running)
            orders.append(MigrationOrder(src.index, dst.index, [s.request_id for s in running],
                                         why + f" ({len(running)} running, {kv} KV tokens)", "running"))
    return orders
