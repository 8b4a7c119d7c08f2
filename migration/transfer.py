"""Moving running samples, with their KV, from one engine to another over a collective group (no Ray inside).

One migration order moves a few samples from a source to a destination in two stages (Llumnix-style):

    source                                          destination
    PLANNED                                         RESERVED         slots held before anything is sent
                  the plan: prompts, lengths ---->                   the K/V blocks the samples will need set aside
                  <---- skips, or a refusal                          (a refusal ends the order: nothing was copied)
    STAGE1_SENT   committed KV prefix  ---------->  STAGE1_RECEIVED  the source keeps decoding meanwhile
    FROZEN        at a step boundary: export the delta and state, remove the samples, hold their slots
    STAGE2_SENT   delta + state        ---------->  IMPORTED         at a step boundary, into the reserved slots
                  the verdict (from the balancer): moved = what the destination imported
    RELEASED      drops its copy, frees the slots   CONFIRMED        outputs of the samples may leave
    RESUMED       re-imports its copy (not moved)   ABORTED          reservation released (any failure)
    ABORTED       failed or refused before the freeze: the samples never stopped

Before any K/V moves, the source sends its plan (each sample's prompt and length) and the destination sets
aside, from its paged pool, the blocks the samples will hold (their tokens and a margin for what they add during
the copy, `Slots.reserve_kv`), or refuses when the pool cannot spare them: the samples then decode on at the source.
A prompt's full blocks travel once: siblings of a sample the destination holds, or of the order's first sample
with that prompt, share them there (copy-on-write, as admission shares a group's prompt), and the source leaves
those positions out of what it sends (`TransferRecord.skipped_positions`). A dense cache reserves slots only.

Stop-and-copy (`two_stage=False`) skips stage 1: stage 2 then carries the whole KV. The source never decides
alone whether a frozen sample moved: only the destination knows whether it imported, so the source holds its
copy (whole, skipped positions included) and the blocks its samples gave back until the verdict. Each stage is
one contiguous buffer (all layers' K/V of target and draft for every sample in the order) plus a small pickled
header, sent as three messages: sizes, header, payload."""
from __future__ import annotations

import dataclasses
import enum
import pickle
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import torch

from drafting.records import KVRange, SampleState

AtBoundary = Callable[[Callable[[], object]], object]  # runs a function at the engine's next step boundary
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_KV_FIELDS = ("target_k", "target_v", "draft_k", "draft_v", "target_h")  # target_h: a draft head's features
_NF = len(_KV_FIELDS)


class SourceState(enum.Enum):
    PLANNED = "planned"
    STAGE1_SENT = "stage1_sent"
    FROZEN = "frozen"
    STAGE2_SENT = "stage2_sent"
    RELEASED = "released"
    RESUMED = "resumed"
    ABORTED = "aborted"


class DestState(enum.Enum):
    RESERVED = "reserved"
    STAGE1_RECEIVED = "stage1_received"
    STAGE2_RECEIVED = "stage2_received"
    IMPORTED = "imported"
    CONFIRMED = "confirmed"
    ABORTED = "aborted"


@dataclass
class TransferRecord:
    """One side's account of an order: what moved, how many bytes, how long each stage took."""

    order_id: int
    state: str
    request_ids: list = field(default_factory=list)  # source: samples frozen; destination: samples imported
    bytes: int = 0
    stage1_ms: float = 0.0
    stage2_ms: float = 0.0
    t_freeze: float | None = None  # source: wall clock when the samples left its batch
    t_resume: float | None = None  # destination: wall clock when its first step with them began
    error: str | None = None
    refused: str | None = None  # why the destination turned the order down (before any K/V was copied)
    kv_bytes: int = 0  # of `bytes`, the K/V payloads of both stages
    skipped_positions: int = 0  # K/V positions not copied: the destination shares its copy of the prompt
    skipped_bytes: int = 0  # (source) their bytes


# ---- wire format ---------------------------------------------------------------------------------------------
def pack(meta: object, tensors: Sequence[torch.Tensor | None], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(header [H] uint8, payload [N]): tensors flattened into one buffer, their shapes and `meta` pickled."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype if present else torch.float32
    if any(t.dtype != dtype for t in present):
        raise ValueError("pack: all KV tensors of one transfer must share a dtype")
    shapes = [None if t is None else tuple(t.shape) for t in tensors]
    header = torch.frombuffer(bytearray(pickle.dumps((meta, shapes, _DTYPES.index(dtype)))), dtype=torch.uint8)
    payload = torch.cat([t.reshape(-1) for t in present]) if present else torch.empty(0, dtype=dtype)
    return header.to(device), payload.to(device)


def unpack(header: torch.Tensor, payload: torch.Tensor) -> tuple[object, list[torch.Tensor | None]]:
    """Inverse of pack; the tensors are views into the payload."""
    meta, shapes, _ = pickle.loads(header.cpu().numpy().tobytes())
    out, offset = [], 0
    for shape in shapes:
        if shape is None:
            out.append(None)
            continue
        n = 1
        for d in shape:
            n *= d
        out.append(payload[offset:offset + n].view(shape))
        offset += n
    return meta, out


def send_stage(group, peer: int, tag: int, meta: object, tensors: Sequence[torch.Tensor | None]) -> int:
    """Send one stage to `peer`; returns the bytes sent."""
    header, payload = pack(meta, tensors, group.device)
    dtype = _DTYPES.index(payload.dtype)
    sizes = torch.tensor([header.numel(), payload.numel(), dtype], dtype=torch.int64, device=group.device)
    group.send(sizes, peer, tag)
    group.send(header, peer, tag + 1)
    if payload.numel():
        group.send(payload, peer, tag + 2)
    return sizes.numel() * 8 + header.numel() + payload.numel() * payload.element_size()


def recv_stage(group, peer: int, tag: int) -> tuple[object, list[torch.Tensor | None], int]:
    """Receive one stage from `peer`: (meta, tensors, bytes)."""
    sizes = group.recv(torch.zeros(3, dtype=torch.int64, device=group.device), peer, tag)
    n_header, n_payload, dtype = (int(x) for x in sizes.tolist())
    header = group.recv(torch.empty(n_header, dtype=torch.uint8, device=group.device), peer, tag + 1)
    payload = torch.empty(n_payload, dtype=_DTYPES[dtype], device=group.device)
    if n_payload:
        group.recv(payload, peer, tag + 2)
    meta, tensors = unpack(header, payload)
    return meta, tensors, sizes.numel() * 8 + n_header + n_payload * payload.element_size()


def stage_tag(order_id: int, stage: int) -> int:
    """Message tags unique per (order, stage), so concurrent orders between one pair never mix."""
    return ((order_id % (1 << 24)) * 4 + stage) * 4


def _strip(state: SampleState) -> SampleState:
    return dataclasses.replace(state, **{f: None for f in _KV_FIELDS})


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _from(fields: Sequence[torch.Tensor | None], skip: int) -> list[torch.Tensor | None]:
    """K/V tensors ([.., .., positions, ..]) without their first `skip` positions."""
    return [None if t is None else t[:, :, skip:] for t in fields]


# ---- the two sides --------------------------------------------------------------------------------------------
class Emigration:
    """Source side of one running-sample order. `run` does the plan, stage 1 and stage 2; `finish` applies the
    verdict."""

    def __init__(self, order_id: int, request_ids: Sequence[Hashable], peer: int, two_stage: bool, group, engine,
                 at_boundary: AtBoundary, fault: Callable[[str], None] = lambda point: None):
        self.order_id, self.request_ids, self.peer, self.two_stage = order_id, list(request_ids), peer, two_stage
        self.group, self.engine, self.at_boundary, self.fault = group, engine, at_boundary, fault
        self.state = SourceState.PLANNED
        self.record = TransferRecord(order_id, self.state.value)
        self.skip: dict = {}  # the destination's answer: request id -> (positions it has, who brings them)
        self.prefix: dict[Hashable, KVRange] = {}  # stage 1's copies, whole (what was sent may start later)
        self.sent_from: dict[Hashable, int] = {}  # the first position of each sample's stage 1 that was sent
        self.frozen: list[SampleState] = []  # the fallback: what the source re-imports if the move fails
        self.hold = None  # the blocks the frozen samples gave back, held for a resume

    def _set(self, state: SourceState) -> None:
        self.state = state
        self.record.state = state.value

    def run(self) -> TransferRecord:
        try:
            if not self._plan():
                return self.record
            if self.two_stage:
                self._stage1()
            self.fault("source:after_stage1")
        except Exception as e:  # noqa: BLE001 - the samples never stopped: nothing to undo
            self._abort(f"{type(e).__name__}: {e}")
            return self.record
        self._freeze()
        try:
            states = [self._outgoing(s) for s in self.frozen]
            tensors = [getattr(s, f) for s in states for f in _KV_FIELDS]
            self.record.bytes += send_stage(self.group, self.peer, stage_tag(self.order_id, 2),
                                            [_strip(s) for s in states], tensors)
            self.record.kv_bytes += _nbytes(tensors)
        except Exception as e:  # noqa: BLE001 - whether the destination imported is its call: wait for the verdict
            self.record.error = f"{type(e).__name__}: {e}"
        self.record.stage2_ms = 1000 * (time.time() - self.record.t_freeze)  # freeze, export, send
        self._set(SourceState.STAGE2_SENT)
        return self.record

    def _abort(self, error: str | None, refused: str | None = None) -> None:
        self.at_boundary(lambda: self.engine.pin(self.request_ids, False))
        self._set(SourceState.ABORTED)
        self.record.error, self.record.refused = error, refused

    def _plan(self) -> bool:
        """Tell the destination what comes (each sample's prompt, committed tokens and most tokens); its answer is
        which leading positions it has already (or will have from a sibling of the order), or a refusal: then
        the order ends here, nothing copied, and the samples decode on. False when refused."""
        def plan() -> list[tuple]:
            self.engine.pin(self.request_ids)  # a sample being copied is not preempted meanwhile
            prompts = {q.request_id: q.prompt_token_ids for q in self.engine.live}
            loads = {rid: (kv + 1, kv + 1 - gen + max_new) for rid, kv, gen, max_new in self.engine.sample_loads()}
            return [(rid, list(prompts[rid]), *loads[rid]) for rid in self.request_ids if rid in loads]

        # one step boundary for the plan and stage 1's copies (a boundary more would let short samples end first)
        planned, self._exported = self.at_boundary(lambda: (plan(), self._export() if self.two_stage else None))
        self.record.bytes += send_stage(self.group, self.peer, stage_tag(self.order_id, 0), planned, [])
        answer, _, n = recv_stage(self.group, self.peer, stage_tag(self.order_id, 3))
        self.record.bytes += n
        if answer["refused"] is not None:
            self._abort(None, answer["refused"])
            return False
        self.skip = answer["skip"]
        return True

    def _skip(self, rid: Hashable, present, fields: Sequence[torch.Tensor | None]) -> int:
        """Leading positions of this sample not to send: those the destination has, or gets from a sibling sent
        whole with it (in `present`); none where the copy is shorter."""
        skip, brings = self.skip.get(rid, (0, None))
        if not skip or (brings is not None and brings not in present):
            return 0
        return skip if all(t is None or t.shape[2] >= skip for t in fields) else 0

    def _stage1(self) -> None:
        """Copy each sample's committed KV prefix (target and draft up to the shorter of the two, so stage 2 can
        start both at one position; whole blocks of a paged cache, its last one still filling) and send it, less
        the positions the destination shares, while the samples keep decoding here."""
        t0, self.prefix = self._exported  # copied at the plan's boundary (timed from there)
        meta, tensors = [], []
        for rid, kr in self.prefix.items():
            fields = [getattr(kr, f) for f in _KV_FIELDS]
            self.sent_from[rid] = skip = self._skip(rid, self.prefix, fields)
            meta.append((rid, skip))
            tensors += _from(fields, skip)
        self.record.bytes += send_stage(self.group, self.peer, stage_tag(self.order_id, 1), meta, tensors)
        self.record.kv_bytes += _nbytes(tensors)
        self.record.stage1_ms = 1000 * (time.perf_counter() - t0)
        self._set(SourceState.STAGE1_SENT)

    def _export(self) -> tuple[float, dict]:
        """At a step boundary: each sample's committed K/V prefix, whole blocks (the last, still filling, goes in
        stage 2), target and draft up to the shorter of the two."""
        t0, out = time.perf_counter(), {}
        self.engine.pin(self.request_ids)
        for rid in self.request_ids:
            try:
                kv = self.engine.export_kv(rid, 0, self.engine.max_len)
            except KeyError:
                continue  # finished meanwhile
            cut = kv.target_k.shape[2] if kv.draft_k is None else min(kv.target_k.shape[2], kv.draft_k.shape[2])
            cut -= cut % self.engine.kv_block if self.engine.kv_block else 0  # whole blocks; the tail in stage 2
            trim = lambda t: None if t is None else t[:, :, :cut]  # noqa: E731
            out[rid] = KVRange(0, *(trim(getattr(kv, f)) for f in _KV_FIELDS))
        return t0, out

    def _freeze(self) -> None:
        """At a step boundary: export what stage 1 did not carry plus the state (from position 0 where the sibling
        that was to bring the prompt is gone), take the samples out of the batch and hold their slots and the
        blocks they gave back, so a failed move can resume them here."""
        wanted = list(self.prefix) if self.two_stage else self.request_ids

        def freeze() -> tuple[float, list[SampleState]]:
            t_freeze, states = time.time(), []
            for rid in wanted:
                start = self.prefix[rid].target_k.shape[2] if rid in self.prefix else 0
                try:
                    states.append(self.engine.export_sample(rid, kv_start=start))
                except KeyError:
                    continue  # finished between the stages
            ids = {s.request_id for s in states}
            for i, s in enumerate(states):
                if self.sent_from.get(s.request_id) and self._skip(s.request_id, ids, []) == 0:
                    states[i] = self.engine.export_sample(s.request_id)  # stage 1 skipped what nobody brings now
                    self.sent_from[s.request_id] = 0
            used = self.engine.stats().kv_blocks_used
            for state in states:  # only once every copy exists
                self.engine.remove(state.request_id)
            self.engine.reserve_slots(len(states))  # their own slots, just freed: held for a resume ...
            n = [len(s.prompt_token_ids) + len(s.token_ids) for s in states]
            self.hold = self.engine.reserve_kv(  # ... and the blocks they gave back
                [(s.request_id, s.prompt_token_ids, k, k) for s, k in zip(states, n)], share=False,
                at_most=used - self.engine.stats().kv_blocks_used)
            return t_freeze, states

        self.record.t_freeze, self.frozen = self.at_boundary(freeze)
        self.record.request_ids = [s.request_id for s in self.frozen]
        self._set(SourceState.FROZEN)

    def _outgoing(self, state: SampleState) -> SampleState:
        """What stage 2 sends of a frozen sample: its state with the K/V stage 1 did not send, less (stop-and-copy)
        the positions the destination shares; the skipped positions counted."""
        rid = state.request_id
        if self.two_stage:  # stage 1 carried [sent_from, kv_start) (from 0 where the state is whole: kv_start 0)
            skip = self.sent_from[rid]
            whole = self.prefix[rid]
        else:
            skip = self._skip(rid, set(self.record.request_ids), [getattr(state, f) for f in _KV_FIELDS])
            whole = state
            state = dataclasses.replace(state, kv_start=skip,
                                        **dict(zip(_KV_FIELDS, _from([getattr(state, f) for f in _KV_FIELDS], skip))))
        self.record.skipped_positions += skip
        self.record.skipped_bytes += _nbytes(t[:, :, :skip] for t in (getattr(whole, f) for f in _KV_FIELDS)
                                             if t is not None)
        return state

    def finish(self, moved: Sequence[Hashable]) -> TransferRecord:
        """The verdict: samples in `moved` live on at the destination; every other frozen one resumes here."""
        if self.state is not SourceState.STAGE2_SENT:
            return self.record
        moved = set(moved)
        back = [s for s in self.frozen if s.request_id not in moved]

        def settle() -> None:
            self.engine.release_slots(len(self.frozen))
            try:
                for s in back:
                    self.engine.import_sample(s, prefix=[self.prefix[s.request_id]] if s.request_id in self.prefix
                                              else [], reservation=self.hold)
            finally:
                if self.hold is not None:
                    self.engine.release_kv(self.hold)
                    self.hold = None

        self.at_boundary(settle)
        self.frozen, self.prefix = [], {}
        self._set(SourceState.RESUMED if back else SourceState.RELEASED)
        return self.record


class Immigration:
    """Destination side of one running-sample order: reserve slots, then (the source's plan) the K/V blocks, receive
    both stages, import at a step boundary. margin: the tokens a sample may add while it is copied, reserved on
    top of its committed ones (None: one block); a sample that outgrows it takes what more it needs from the pool
    when it lands."""

    def __init__(self, order_id: int, slots: int, peer: int, two_stage: bool, group, engine, at_boundary: AtBoundary,
                 on_import: Callable[[Hashable], None] = lambda rid: None,
                 fault: Callable[[str], None] = lambda point: None, margin: int | None = None):
        self.order_id, self.slots, self.peer, self.two_stage = order_id, slots, peer, two_stage
        self.group, self.engine, self.at_boundary = group, engine, at_boundary
        self.on_import, self.fault = on_import, fault
        self.margin = engine.kv_block if margin is None else margin
        self.held = 0
        self.kv = None  # the K/V blocks held for the order (`Engine.reserve_kv`), from the plan to the imports
        self.state = DestState.RESERVED
        self.record = TransferRecord(order_id, self.state.value)

    def _set(self, state: DestState) -> None:
        self.state = state
        self.record.state = state.value

    def reserve(self) -> bool:
        """Hold `slots` free slots for this order, or refuse (before anything is sent) when there are fewer."""
        def take() -> bool:
            if not self.engine.reserve_slots(self.slots):
                return False
            self.held = self.slots
            return True

        ok = self.at_boundary(take)
        if not ok:
            self._set(DestState.ABORTED)
            self.record.error = self.record.refused = f"refused: fewer than {self.slots} free slots"
        return ok

    def _plan(self) -> bool:
        """The source's plan in, the blocks its samples need set aside (their prompt's full blocks once, none where
        a sample here holds the prompt), the answer out: what the source may leave out, or a refusal (the slots go
        back, the order ends). False when refused."""
        plan, _, n = recv_stage(self.group, self.peer, stage_tag(self.order_id, 0))
        self.record.bytes += n
        self.kv = self.at_boundary(lambda: self.engine.reserve_kv(plan, self.margin))
        if self.kv is None:
            s = self.engine.stats()
            refused = (f"refused: the K/V pool ({s.kv_blocks - s.kv_blocks_used} of {s.kv_blocks} blocks of "
                       f"{s.kv_block} free) cannot hold {len(plan)} samples of "
                       f"{sum(k for _, _, k, _ in plan)} tokens (+{self.margin} each)")
            self.record.bytes += send_stage(self.group, self.peer, stage_tag(self.order_id, 3),
                                            {"refused": refused}, [])
            self.abort(None, refused)
            return False
        self.record.bytes += send_stage(self.group, self.peer, stage_tag(self.order_id, 3),
                                        {"refused": None, "skip": self.kv.skip}, [])
        return True

    def run(self) -> TransferRecord:
        try:
            if not self._plan():
                return self.record
            prefix = {}
            if self.two_stage:
                t0 = time.perf_counter()
                meta, tensors, n = recv_stage(self.group, self.peer, stage_tag(self.order_id, 1))
                prefix = {rid: KVRange(start, *tensors[_NF * i:_NF * i + _NF]) for i, (rid, start) in enumerate(meta)}
                self.record.bytes += n
                self.record.kv_bytes += _nbytes(tensors)
                self.record.stage1_ms = 1000 * (time.perf_counter() - t0)
                self._set(DestState.STAGE1_RECEIVED)
            self.fault("destination:after_stage1")
            t0 = time.perf_counter()
            metas, tensors, n = recv_stage(self.group, self.peer, stage_tag(self.order_id, 2))
            self.record.bytes += n
            self.record.kv_bytes += _nbytes(tensors)
            states = [dataclasses.replace(m, **dict(zip(_KV_FIELDS, tensors[_NF * i:_NF * i + _NF])))
                      for i, m in enumerate(metas)]
            self._set(DestState.STAGE2_RECEIVED)
        except Exception as e:  # noqa: BLE001 - the source resumes its copy; give the slots and blocks back
            self.abort(e)
            return self.record

        def land() -> float:
            self.engine.release_slots(self.held)  # released right before the imports take the slots
            self.held = 0
            try:
                for s in states:  # in the plan's order: a sample that brings its prompt lands before its siblings
                    self.engine.import_sample(s, prefix=[prefix[s.request_id]] if s.request_id in prefix else [],
                                              reservation=self.kv)
                    self.record.request_ids.append(s.request_id)
                    self.on_import(s.request_id)
            finally:
                self.record.skipped_positions = self.kv.shared_positions
                self.engine.release_kv(self.kv)  # what the imports did not take
                self.kv = None
            return time.time()  # the step that runs next is the first with these samples

        try:
            self.record.t_resume = self.at_boundary(land)
        except Exception as e:  # noqa: BLE001 - samples imported before the error stay (and count as moved)
            self.abort(e)
            return self.record
        self.record.stage2_ms = 1000 * (time.perf_counter() - t0)
        self._set(DestState.IMPORTED)
        return self.record

    def abort(self, error: Exception | None, refused: str | None = None) -> None:
        """End the order here: the record says why (an error, or the refusal); slots and blocks still held go
        back."""
        self.record.error = None if error is None else f"{type(error).__name__}: {error}"
        self.record.refused = refused
        if self.held or self.kv is not None:
            def release() -> None:
                self.engine.release_slots(self.held)
                self.held = 0
                if self.kv is not None:
                    self.engine.release_kv(self.kv)
                    self.kv = None

            self.at_boundary(release)
        self._set(DestState.ABORTED)

    def confirm(self) -> None:
        self._set(DestState.CONFIRMED)
