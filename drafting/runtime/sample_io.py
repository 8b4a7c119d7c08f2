"""A live sample out of an engine and into another, between steps: its K/V (target, draft, a head's features) as
`KVRange`s and its state as a `SampleState`. The unit migration moves (`migration/transfer.py`), in two stages: the
committed prefix while the sample decodes, then the delta and the state."""
from __future__ import annotations

from typing import Hashable, Sequence

import torch

from drafting.records import GenRequest, KVRange, SampleState, SamplingParams
from drafting.runtime.slots import Reservation, Slots


@torch.inference_mode()
def export_kv(slots: Slots, carried, request_id: Hashable, start: int, end: int) -> KVRange:
    """Copy of a live sample's committed K/V for positions [start, end) (clipped to what is committed), with its
    draft source's state. carried: (the target's K/V cache, the draft source or None)."""
    row = slots.row(request_id)
    tcache, source = carried
    tl, dl = int(slots.h["n"][row]) - 1, int(slots.h["dlen"][row])
    if not 0 <= start <= end:
        raise ValueError(f"export_kv {request_id!r}: bad range [{start}, {end})")
    tk, tv = tcache.read(row, start, max(start, min(end, tl)))
    state = {} if source is None else source.export(row, start, min(end, tl), min(end, dl))
    return KVRange(start, tk, tv, **state)


@torch.inference_mode()
def export_sample(slots: Slots, carried, request_id: Hashable, kv_start: int = 0) -> SampleState:
    """Snapshot of a live sample between steps (K/V from kv_start on); the sample stays until removed."""
    row, h = slots.row(request_id), slots.h
    req = slots.live[row]
    n, plen = int(h["n"][row]), int(h["plen"][row])
    kv = export_kv(slots, carried, request_id, kv_start, n)
    toks = slots.h_tokens[row, :n].tolist()
    return SampleState(
        request_id=req.request_id, prompt_token_ids=toks[:plen], token_ids=toks[plen:],
        sampling=SamplingParams(**vars(req.sampling)), seed=int(slots.stages.rows["seed"][row]),
        steps=int(h["steps"][row]), drafted=int(h["drafted"][row]), accepted=int(h["accepted"][row]),
        logprobs=slots.h_logp[row, plen:n].tolist() if req.sampling.logprobs else None,
        target_len=n - 1, draft_len=int(h["dlen"][row]), kv_start=kv_start,
        target_k=kv.target_k, target_v=kv.target_v, draft_k=kv.draft_k, draft_v=kv.draft_v, target_h=kv.target_h)


@torch.inference_mode()
def import_sample(slots: Slots, carried, state: SampleState, prefix: Sequence[KVRange] = (),
                  reservation: Reservation | None = None) -> None:
    """Continue an exported sample here; `prefix` ranges (stage 1 copies) plus the state's own K/V must cover the
    target's committed positions. Draft K/V not covered is recomputed by the draft. With a migration's
    `reservation`, the row's blocks come from those it set aside, and positions before the first range are the
    prompt's full blocks it pinned (shared, not copied); a sample that brings its prompt's blocks pins them there
    for its siblings in the order."""
    rid = state.request_id
    if rid in slots:
        raise ValueError(f"import_sample: request {rid!r} is already in this engine")
    if len(slots.live) >= slots.max_slots:
        raise RuntimeError(f"import_sample {rid!r}: no free slot (max_slots={slots.max_slots})")
    n = len(state.prompt_token_ids) + len(state.token_ids)
    if n > slots.max_len - 1:
        raise ValueError(f"import_sample {rid!r}: {n} tokens do not fit max_len={slots.max_len}")
    if state.target_len != n - 1:
        raise ValueError(f"import_sample {rid!r}: target_len {state.target_len} != tokens - 1 = {n - 1}")
    ranges = sorted(list(prefix) + [KVRange(state.kv_start, state.target_k, state.target_v, state.draft_k,
                                            state.draft_v, state.target_h)], key=lambda x: x.start)
    row, key, mem = len(slots.live), tuple(state.prompt_token_ids), slots.memory
    shared = _share(slots, row, rid, ranges[0].start, reservation.shared.get(key) if reservation else None)
    # the row's blocks before its K/V land in them
    if not mem.claim(row, n, reservation.blocks if reservation is not None else None):
        mem.release(row)
        raise RuntimeError(f"import_sample {rid!r}: no room in the K/V pool for {n} positions")
    try:
        d_cov = _load(carried, row, state, ranges, shared)
    except Exception:
        mem.release(row)
        raise
    sp = SamplingParams(**vars(state.sampling))
    slots.place([GenRequest(rid, list(state.prompt_token_ids), sp, group=state.group)],
                [(state.prompt_token_ids, state.token_ids, sp, state.seed, (state.steps, state.drafted, state.accepted),
                  state.logprobs, min(d_cov, state.draft_len, n - 1))])
    if reservation is not None:
        reservation.shared_positions += shared
        full = mem.full_blocks(len(key))
        drafted = carried[1] is None or d_cov >= full * mem.block  # (the draft's K/V too)
        if full and key not in reservation.shared and drafted:  # it brought them: its siblings'
            reservation.shared[key] = mem.blocks_of(row)[:full]
            mem.hold(reservation.shared[key])


def _share(slots: Slots, row: int, rid: Hashable, start: int, blocks: list[int] | None) -> int:
    """Positions [0, start) of the row from shared blocks (a reservation's, pinned); returns start."""
    block = slots.memory.block
    if start and (not blocks or start % block or start > len(blocks) * block):
        raise ValueError(f"import_sample {rid!r}: target KV gap at positions [0, {start})")
    if start:
        slots.memory.share_blocks(row, blocks[:start // block])
    return start


def _load(carried, row: int, state: SampleState, ranges: Sequence[KVRange], covered: int) -> int:
    """The ranges' K/V into the row (positions [0, covered) are there already); returns the draft positions
    covered from 0."""
    rid, (tcache, source) = state.request_id, carried
    d_cov = covered
    for kr in ranges:
        if kr.start > covered:
            raise ValueError(f"import_sample {rid!r}: target KV gap at positions [{covered}, {kr.start})")
        tcache.load(row, kr.start, kr.target_k, kr.target_v)
        covered = max(covered, kr.start + kr.target_k.shape[2])
        if source is not None:
            d_cov = source.load(row, kr, d_cov, f"import_sample {rid!r}")
    if covered < state.target_len:
        raise ValueError(f"import_sample {rid!r}: target KV covers [0, {covered}), need [0, {state.target_len})")
    return d_cov
