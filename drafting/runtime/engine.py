"""The speculative generation engine: continuous batching over sample slots, tree drafting, one-pass tree
verification and lossless acceptance. No Ray inside; `actors/` wraps it.

Read `step` first: one step top to bottom. The loop it runs is `drafting/runtime/step.py` (shared with
`bench.simulate`), its stages `drafting/spec/stages.py`, who holds which row `drafting/runtime/slots.py`, and a
sample's export/import for migration `drafting/runtime/sample_io.py`. Each stage reads and writes preallocated
device buffers only, with shapes fixed by its arguments: no host reads inside, so on CUDA each runs as a captured
graph, on CPU as the eager call of the same function. The host learns what a step did from one copy at its end
(emitted tokens, counts, finish flags) and keeps its own mirrors of the per-sample lengths, so the next step's
shape is decided without reading the device."""
from __future__ import annotations

import collections
from typing import Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np
import torch

from drafting.model.attention import resolve_backend
from drafting.model.decoder import LeanDecoder, compiled_ops
from drafting.model.head import DraftHead, HeadDecoder, is_head_dir
from drafting.policy.adaptive import adaptive
from drafting.policy.calibration import Calibration, as_calibration, calibration_key
from drafting.policy.strategy import DraftStrategy, parse_strategy
from drafting.records import EngineStats, GenOutput, GenRequest, KVRange, SampleState, SamplingParams
from drafting.runtime import admission, sample_io
from drafting.runtime.blocks import BlockPool
from drafting.runtime.device_stages import DeviceStages, scratch_columns
from drafting.runtime.graphs import GraphRunner
from drafting.runtime.kv_cache import KVCache, PagedKVCache
from drafting.runtime.memory import DenseMemory, PagedMemory
from drafting.runtime.rollout_drafts import RolloutDrafts
from drafting.runtime.slots import Reservation, Slots
from drafting.runtime.step import run_step
from drafting.runtime.timing import StageClock, StepTimer
from drafting.spec.sampling import derive_seed
from drafting.spec.suffix import SuffixConfig
from drafting.spec.stages import MAX_DEPTH, OUT_EXTRA, Stages

FINISH = {1: "stop", 2: "length"}
CalibrationSpec = Calibration | str | Callable[["Engine"], Calibration] | None


class Engine:
    """Target + draft decoders with `max_slots` sample slots; requests beyond capacity wait in a FIFO."""

    def __init__(self, target, draft=None, strategy: str | DraftStrategy = "tree:4,2,16", max_slots: int = 64,
                 max_len: int = 256, device="cpu", dtype: torch.dtype = torch.float32,
                 eos_token_id: int | Sequence[int] | None = None, node_log_steps: int = 256,
                 calibration: CalibrationSpec = None, step_log_steps: int = 100000, attention: str = "auto",
                 cuda_graphs: bool = True, compile: bool | None = None, adaptive_mode: str = "auto",
                 kv_cache: str = "paged", kv_block: int = 16, kv_bytes: int | None = None,
                 swap_bytes: int = 4 << 30, share_prompts: bool = True, rollout_drafts: SuffixConfig | None = None):
        """calibration (needed by strategy 'adaptive'): a `Calibration`, a calibration file, or a resolver
        called with this engine ('auto', this pair's cached profile or one made on first use, is resolved by
        `drafting.SpeculativeEngine`: the runtime never runs the profiler). attention: 'auto' | 'sdpa' | 'triton'.
        cuda_graphs, compile (torch.compile'd norms, RoPE, activations; None: on CUDA): the GPU path (ignored on
        CPU, which stays eager and exact). adaptive_mode: 'host' (per-level decisions from the tree's scores),
        'device' (the step's shape from earlier steps' statistics: no reads inside a step) or 'auto' (device on
        CUDA, host on CPU). kv_cache: 'dense' (a row of max_len per slot) or 'paged' (blocks of kv_block positions
        from a pool of kv_bytes for all models' K/V: by default what the dense rows would hold, on CUDA 90% of the
        memory free after the weights; preempted samples swap to host memory up to swap_bytes, beyond it they are
        recomputed when they resume; share_prompts: a request group's prompt prefilled once, its blocks shared).
        rollout_drafts: draft chains from the rollout itself as well (a request's prompt, its group's siblings, the
        history it brings: `drafting.runtime.rollout_drafts`), verified in the same tree as the draft model's nodes
        (or alone: with draft=None, strategy 'none' verifies the chains wherever there are any, 'adaptive' where
        they pay)."""
        check_args(max_slots, max_len, adaptive_mode, calibration, kv_cache)
        self.device, self.dtype = torch.device(device), dtype
        self.max_slots, self.max_len = max_slots, max_len
        self.adaptive_mode = adaptive_mode if adaptive_mode != "auto" else (
            "device" if self.device.type == "cuda" else "host")
        self.target = decoder(target, "target", self.device, dtype, max_len)
        self.draft = None if draft is None else decoder(draft, "draft", self.device, dtype, max_len, self.target)
        for m in (self.target, self.draft):
            if m is not None:
                m.attention = resolve_backend(attention, self.device, m.shape.head_dim)
                if (compile is None or compile) and self.device.type == "cuda":
                    m.ops = compiled_ops()
        self.head = isinstance(self.draft, HeadDecoder)  # an EAGLE-style head: it reads the target's features
        self.keep_features = False  # with a head: outputs carry the target's features (a head's training data)
        chain = rollout_drafts.max_depth if rollout_drafts is not None else 0  # nodes a rollout chain takes
        self.scratch = scratch_columns(strategy) + chain
        columns = max_len + self.scratch + 1  # what a dense row holds
        self.pool = None if kv_cache == "dense" else BlockPool(
            pool_positions(self, kv_bytes, columns) // kv_block, kv_block, max_slots, -(-columns // kv_block),
            self.device)
        self.tcache, self.dcache = caches(self.target, self.draft, self.head, max_slots, max_len, self.scratch,
                                          self.device, dtype, self.pool)
        self.stages = Stages(self.target, self.draft, self.tcache, self.dcache, max_slots, max_len, self.scratch,
                             eos_tensor(self.target, eos_token_id, self.device), self.head, chain)
        self.rollout = None if rollout_drafts is None else RolloutDrafts(rollout_drafts, self.stages)
        memory = DenseMemory(self.scratch) if self.pool is None else PagedMemory(self.pool, (self.tcache, self.dcache),
                                                                                 share_prompts)
        self.slots = Slots(self.stages, (self.tcache, self.dcache), max_slots, max_len, memory)
        self._state = (self.tcache, self.stages.source)  # what a sample's export carries: target K/V, draft state
        self.swap_bytes, self._swapped = swap_bytes, 0  # host memory preempted samples' K/V may take
        self.graphs = GraphRunner(self.device, cuda_graphs)
        self.backend = DeviceStages(self.stages, self.slots, self.graphs)
        self.clock = StageClock(self.device)
        self.calibration_spec, self.calibration = calibration, None
        self.node_log: collections.deque = collections.deque(maxlen=node_log_steps)
        self.step_log: collections.deque = collections.deque(maxlen=step_log_steps)  # one dict per step
        if self.device.type == "cuda":  # the step's one read lands in pinned buffers
            self.h_out_tok = torch.empty(self.stages.out_tok.shape, dtype=torch.long, pin_memory=True)
            self.h_out_lp = torch.empty(self.stages.out_lp.shape, dtype=torch.float32, pin_memory=True)
        self._gen_calls = 0
        self.reset_stats()
        self.set_strategy(strategy)

    # ---- configuration -------------------------------------------------------------------------------------
    def set_strategy(self, strategy: str | DraftStrategy) -> None:
        """Switch the draft strategy between steps (live samples carry on)."""
        if isinstance(strategy, str) and strategy.strip().lower() == "adaptive":
            if self.draft is None and self.rollout is None:
                raise ValueError("strategy 'adaptive' needs a draft model or rollout drafts (draft=None)")
            strategy = adaptive(self.load_calibration(), mode=self.adaptive_mode)
            strategy.has_model = self.draft is not None
        s = parse_strategy(strategy)
        check_strategy(s, self.draft is not None or not getattr(s, "has_model", True), self.target.shape.vocab_size,
                       self.scratch - self.stages.chain)
        self.strategy = self.stages.policy = self.backend.policy = s
        if self.rollout is not None:  # adaptive verifies chains where they pay: where they never do, skip lookups
            self.rollout.gate = s.kind == "adaptive"
        if s.max_depth > 0 or self.rollout is not None:
            self.stages.ensure_drafter()

    @torch.inference_mode()
    def load_target_weights(self, named: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
        """New actor weights by HF parameter name (RLHF weight sync). Call between rollouts: live samples' KV
        were computed with the old weights. (Copied in place: captured graphs keep reading the new values.)"""
        return self.target.load_weights(named)

    @torch.inference_mode()
    def load_draft_weights(self, named: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
        if self.draft is None:
            raise ValueError("load_draft_weights: this engine has no draft model")
        return self.draft.load_weights(named)

    def on_draft_update(self) -> None:
        """The draft's weights changed: acceptance records made with the old draft no longer describe it."""
        self.node_log.clear()
        self.strategy.reset()

    def calibration_key(self) -> dict:
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
        return calibration_key(self.target.config, self.draft.config if self.draft else None, str(self.dtype),
                               device, torch.get_num_threads())

    def load_calibration(self) -> Calibration:
        """The calibration this engine's adaptive strategy and the load balancer use (see __init__)."""
        if self.calibration is None:
            spec = self.calibration_spec
            if spec is None:
                raise ValueError("strategy 'adaptive' needs a calibration: a file from `python -m drafting.profile`"
                                 " or calibration='auto'")
            self.calibration = spec(self) if callable(spec) else as_calibration(spec, self.calibration_key())
        return self.calibration

    @property
    def saturation_live(self) -> int | None:
        """Live samples where plain decoding's throughput stops growing (the roofline's saturation point)."""
        if self.calibration is None and self.calibration_spec is not None:
            self.load_calibration()
        return None if self.calibration is None else self.calibration.saturation_live

    # ---- requests ------------------------------------------------------------------------------------------
    @property
    def live(self) -> list[GenRequest]:
        return self.slots.live

    @property
    def queue(self) -> collections.deque[GenRequest]:
        return self.slots.queue

    def add(self, request: GenRequest) -> None:
        """Queue a request; it joins the batch at the next step with a free slot."""
        if request.request_id in self.slots:
            raise ValueError(f"request {request.request_id!r} is already in this engine")
        check_request(request, self.max_len, self.target.shape.vocab_size)
        if request.sampling.seed is None:
            request.sampling.seed = int(torch.randint(0, 2**62, (1,)).item())
        self.slots.enqueue(request)
        if self.rollout is not None:
            self.rollout.add(request)

    def remove(self, request_id: Hashable) -> None:
        """Drop a queued or live request (e.g. after a migration was confirmed); its slot frees at once."""
        if request_id in self.slots.row_of:
            self.slots.release(self.slots.row_of[request_id])
        elif request_id in self.slots.queued_ids:
            self.slots.dequeue(request_id)
        else:
            raise KeyError(f"request {request_id!r} is not in this engine")
        if self.rollout is not None:
            self.rollout.finish(request_id)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[GenOutput]:
        """Run prompts to completion; outputs in prompt order. One shared SamplingParams with a seed gives each
        prompt its own derived seed (equal prompts then still sample independently)."""
        params = per_prompt(sampling if sampling is not None else SamplingParams(), len(prompts))
        self._gen_calls += 1
        ids = [("generate", self._gen_calls, i) for i in range(len(prompts))]
        for rid, p, sp in zip(ids, prompts, params):
            self.add(GenRequest(rid, list(p), sp))
        done, wanted = {}, set(ids)
        while len(done) < len(ids):
            done.update((o.request_id, o) for o in self.step() if o.request_id in wanted)
        return [done[i] for i in ids]

    @torch.inference_mode()
    def admit(self) -> None:
        """Move queued requests into free slots (FIFO): preempted samples resume, a request group's prompt is
        prefilled once (`drafting.runtime.admission`)."""
        if self.slots.queue:
            done = admission.admit(self.slots, self.stages, self._state)
            self._swapped -= done.pop("swapped_bytes")
            self._counts.update(done)
            if not self.slots.live and not self.slots.reserved and self.slots.queue:  # (held slots: samples are coming)
                q = self.slots.queue[0]
                raise RuntimeError(f"request {q.request_id!r} cannot start: the K/V pool "
                                   f"({self.slots.memory.stats()}) has no room for its prompt")
    def _preempt(self, row: int) -> None:
        self._swapped += admission.preempt(self.slots, self._state, row, self.swap_bytes - self._swapped)
        self._counts["preemptions"] += 1

    # ---- the step ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[GenOutput]:
        """Admit queued requests into free slots, advance every live sample by one draft/verify step (or one
        plain token); returns the samples that finished (their slots are already free)."""
        timer = StepTimer(self.clock)
        with timer.host("admit"):
            self.admit()
        if not self.slots.live:
            return []
        drafts = self.strategy.max_depth and self.draft is not None  # (the model's nodes come after the chain's)
        want = min(self.strategy.pool + self.stages.chain, self.scratch - 1) if drafts else 0
        view = self.slots.view(admission.make_room(self.slots, max(want, self.stages.chain), self._preempt))
        if self.rollout is not None:
            with timer.host("rollout"):
                self.rollout.stage(self.slots.live, view)
        timer.log.update({"live": view.live, "ctx": view.context, "lag": view.draft_lag})
        width = run_step(self.backend, self.strategy, view, timer)
        out, lp = self._fetch(view.live, width, timer)  # the step's one device read
        finished = self._commit_host(out, lp, width, timer)
        self._time += timer.total()
        timer.log.update({f"plan_{k}": v for k, v in (getattr(self.strategy, "decision", None) or {}).items()})
        self.step_log.append(timer.log)
        with timer.host("policy"):
            self.strategy.step_done(timer.log)
        return finished

    def _fetch(self, B: int, W: int, timer: StepTimer) -> tuple[np.ndarray, np.ndarray]:
        """The step's outputs on the host (on CUDA non-blocking copies into pinned buffers and one wait), and the
        verified nodes' records when the strategy or the node log wants them."""
        st, records = self.stages, W > 1 and (self.strategy.wants_records() or self.device.type != "cuda")
        cols = list(range(W)) + list(range(st.out_tok.shape[1] - OUT_EXTRA, st.out_tok.shape[1]))
        with timer.host("sync"):
            self.strategy.fetch_async()
            if self.device.type != "cuda":
                out, lp = st.out_tok[:B, cols].numpy(), st.out_lp[:B, :W].numpy()
                rec = records and tuple(t[:B] for t in (st.rec_feats, st.rec_acc, st.rec_tested, st.rec_pred))
            else:
                self.h_out_tok[:B].copy_(st.out_tok[:B], non_blocking=True)
                self.h_out_lp[:B, :W].copy_(st.out_lp[:B, :W], non_blocking=True)
                rec = records and tuple(t[:B].to("cpu", non_blocking=True)
                                        for t in (st.rec_feats, st.rec_acc, st.rec_tested, st.rec_pred))
                torch.cuda.current_stream(self.device).synchronize()
                out, lp = self.h_out_tok[:B, cols].numpy(), self.h_out_lp[:B, :W].numpy()
        timer.resolve()
        if rec:
            self._observe(rec, timer)
        return out, lp

    def _observe(self, records: tuple, timer: StepTimer) -> None:
        """Hand the tested nodes' records to the node log and the strategy."""
        feats, acc, tested, pred = (t[:, :timer.log["width"] - 1] for t in records)
        if bool(tested.any()):
            feats, acc, pred = feats[tested], acc[tested], pred[tested]  # copies (boolean indexing)
            self.node_log.append((feats, acc))
            with timer.host("policy"):
                self.strategy.observe({"features": feats, "accepted": acc, "predicted": pred})

    def _commit_host(self, out: np.ndarray, lp: np.ndarray, W: int, timer: StepTimer) -> list[GenOutput]:
        """The host's side of the commit: mirrors and counts updated, finished samples out and their slots freed."""
        accepted, emitted, finish = self.slots.commit(out, lp, W)
        if self.rollout is not None:
            with timer.host("rollout"):
                self.rollout.commit(self.slots.live, out, W, emitted)
            timer.log["chain_accepted"] = self.rollout.last_accepted
        self._steps, self._sample_steps = self._steps + 1, self._sample_steps + len(out)
        self._accepted, self._tokens = self._accepted + int(accepted.sum()), self._tokens + int(emitted.sum())
        timer.log["accepted"] = int(accepted.sum())
        done = np.nonzero(finish)[0]
        keep = self.keep_features and self.head  # a head's training data: the target's features of the sample
        outs = [self.slots.output(b, FINISH[int(finish[b])], self.tcache if keep else None) for b in done]
        for b in sorted(done.tolist(), reverse=True):  # descending: the row moved into a hole is never finished
            if self.rollout is not None:
                self.rollout.finish(self.slots.live[b].request_id)
            self.slots.release(b)
        return outs

    # ---- migration: a sample out, a sample in, slots held for it -------------------------------------------
    @property
    def reserved(self) -> int:
        return self.slots.reserved

    @property
    def kv_block(self) -> int:
        return 0 if self.pool is None else self.pool.block

    def reserve_slots(self, n: int) -> bool:
        """Hold n slots for samples arriving by migration; False (nothing held) if fewer are free."""
        return self.slots.reserve(n)

    def pin(self, request_ids, pinned: bool = True) -> None:
        """Samples a migration is copying (stage 1): not preempted while others can be."""
        (self.slots.pinned.update if pinned else self.slots.pinned.difference_update)(request_ids)

    def release_slots(self, n: int) -> None:
        """Give back n reserved slots (right before the samples they were held for are imported, or on abort)."""
        self.slots.unreserve(n)

    def reserve_kv(self, plan: Sequence[tuple], margin: int = 0, share: bool = True, at_most: int | None = None
                   ) -> Reservation | None:
        """Set aside the K/V blocks of samples arriving by migration, plan: (request id, prompt tokens, committed
        tokens, most tokens) each; None when the pool cannot spare them (`Slots.reserve_kv`)."""
        return self.slots.reserve_kv(plan, margin, share, at_most)

    def release_kv(self, reservation: Reservation) -> None:
        """The blocks of a reservation no import took go back to the pool (the order is over)."""
        self.slots.release_kv(reservation)

    def sample_loads(self) -> list[tuple[Hashable, int, int, int]]:
        """(request id, committed target KV positions, tokens generated, max_new_tokens) of each live sample:
        what the load balancer ranks samples by when it picks which to move."""
        return self.slots.loads()

    def export_kv(self, request_id: Hashable, start: int, end: int) -> KVRange:
        return sample_io.export_kv(self.slots, self._state, request_id, start, end)

    def export_sample(self, request_id: Hashable, kv_start: int = 0) -> SampleState:
        state = sample_io.export_sample(self.slots, self._state, request_id, kv_start)
        if self.rollout is not None:  # what it drafts from at the destination: its group's documents
            state.group, state.drafts = self.slots.live[self.slots.row(request_id)].group, \
                self.rollout.export(request_id)
        return state

    def import_sample(self, state: SampleState, prefix: Sequence[KVRange] = (),
                      reservation: Reservation | None = None) -> None:
        sample_io.import_sample(self.slots, self._state, state, prefix, reservation)
        if self.rollout is not None:
            self.rollout.load(state)

    def rollout_summary(self) -> dict:
        """Rollout drafts' counts (`RolloutDrafts.summary`); empty when they are off."""
        return {} if self.rollout is None else self.rollout.summary()

    # ---- stats ---------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self._steps = self._sample_steps = self._accepted = self._tokens = 0
        self._time = 0.0
        self._counts = collections.Counter(preemptions=0, resumed=0, prefill_tokens=0, shared_tokens=0)
        if getattr(self, "rollout", None) is not None:
            self.rollout.reset_counts()

    def stats(self) -> EngineStats:
        ss = max(self._sample_steps, 1)
        return EngineStats(live=len(self.live), queued=len(self.queue), steps=self._steps, tokens=self._tokens,
                           tokens_per_s=self._tokens / self._time if self._time > 0 else 0.0,
                           mean_accepted=self._accepted / ss, mean_tokens_per_step=self._tokens / ss,
                           step_ms=1000.0 * self._time / max(self._steps, 1), **self._counts,
                           tokens_held=self.slots.tokens_held(), **self.slots.memory.stats())

    def acceptance_records(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [M, 6], accepted [M]) of every tested node over the last logged steps: what the acceptance
        predictor is fitted on (path value, own draft probability, margin, depth, sibling rank, temperature)."""
        if not self.node_log:
            return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
        vals, acc = zip(*self.node_log)
        return torch.cat(vals), torch.cat(acc)


def check_args(max_slots: int, max_len: int, adaptive_mode: str, calibration, kv_cache: str) -> None:
    if max_slots < 1:
        raise ValueError(f"max_slots must be >= 1, got {max_slots}")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    if kv_cache not in ("dense", "paged"):
        raise ValueError(f"kv_cache {kv_cache!r}: want 'dense' or 'paged'")
    if adaptive_mode not in ("auto", "host", "device"):
        raise ValueError(f"adaptive_mode {adaptive_mode!r}: want 'auto', 'host' or 'device'")
    if isinstance(calibration, str) and calibration == "auto":
        raise ValueError("calibration='auto' is resolved on first use by drafting.SpeculativeEngine (the "
                         "runtime's Engine takes a Calibration, a file or a resolver)")


def position_bytes(target: LeanDecoder, draft: LeanDecoder | None, head: bool, dtype: torch.dtype) -> int:
    """K/V bytes of one token position over every model (and the target's feature a draft head reads)."""
    size = torch.empty(0, dtype=dtype).element_size()
    per = sum(2 * m.shape.layers * m.shape.kv_heads * m.shape.head_dim for m in (target, draft) if m is not None)
    return size * (per + (target.shape.hidden if head else 0))


def pool_positions(engine: "Engine", kv_bytes: int | None, columns: int) -> int:
    """Token positions a paged pool holds: kv_bytes' worth; by default the dense rows' (on CUDA, 90% of the memory
    free after the weights, as vLLM's gpu_memory_utilization)."""
    per = position_bytes(engine.target, engine.draft, engine.head, engine.dtype)
    if kv_bytes is None and engine.device.type == "cuda":
        kv_bytes = int(0.9 * torch.cuda.mem_get_info(engine.device)[0])
    return kv_bytes // per if kv_bytes is not None else engine.max_slots * columns


def per_prompt(sampling: SamplingParams | list[SamplingParams], n: int) -> list[SamplingParams]:
    """Each prompt's own copy; one shared SamplingParams with a seed gives each its own derived seed."""
    if isinstance(sampling, SamplingParams):
        return [SamplingParams(**{**vars(sampling), "seed": None if sampling.seed is None
                                  else derive_seed(sampling.seed, i)}) for i in range(n)]
    if len(sampling) != n:
        raise ValueError(f"sampling: {len(sampling)} SamplingParams for {n} prompts")
    return [SamplingParams(**vars(s)) for s in sampling]


def check_request(request: GenRequest, max_len: int, vocab: int) -> None:
    rid, p = request.request_id, request.prompt_token_ids
    if len(p) == 0:
        raise ValueError(f"request {rid!r}: empty prompt")
    if len(p) > max_len - 1:
        raise ValueError(f"request {rid!r}: prompt has {len(p)} tokens, more than max_len - 1 = {max_len - 1}")
    if min(p) < 0 or max(p) >= vocab:
        raise ValueError(f"request {rid!r}: prompt token ids must be in [0, {vocab})")
    request.sampling.validate(f"request {rid!r} sampling")


def check_strategy(s: DraftStrategy, has_draft: bool, vocab: int, scratch: int) -> None:
    if s.max_depth > 0 and not has_draft:
        raise ValueError(f"strategy {s.name!r} needs a draft model (draft=None)")
    if s.max_depth >= MAX_DEPTH:
        raise ValueError(f"strategy {s.name!r}: depth {s.max_depth} must be < {MAX_DEPTH}")
    if s.max_depth > 0 and s.topk > vocab:
        raise ValueError(f"strategy {s.name!r}: topk {s.topk} exceeds the vocabulary size")
    if s.max_depth > 0 and s.pool >= scratch:
        raise ValueError(f"strategy {s.name!r} drafts up to {s.pool} nodes per sample; this engine was built "
                         f"with room for {scratch - 1} (pass the largest strategy at construction)")


def eos_tensor(target: LeanDecoder, eos, device: torch.device) -> torch.Tensor | None:
    """The stop tokens: given, else the target's generation config's, else its config's."""
    if eos is None:
        eos = getattr(target.generation_config, "eos_token_id", None)
        if eos is None:
            eos = getattr(target.config, "eos_token_id", None)
    if eos is None:
        return None
    return torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long, device=device)


def decoder(model, what: str, device: torch.device, dtype: torch.dtype, max_len: int,
            target: LeanDecoder | None = None) -> LeanDecoder:
    """A path or HF model becomes a LeanDecoder; a LeanDecoder (of another engine) is shared as it is; a draft head
    (its directory, a `DraftHead`) becomes a HeadDecoder over `target`."""
    if what == "draft" and (is_head_dir(model) or isinstance(model, (DraftHead, HeadDecoder))):
        if isinstance(model, HeadDecoder) and model.target is not target:
            raise ValueError("draft: a shared HeadDecoder must read this engine's target")
        return model if isinstance(model, HeadDecoder) else HeadDecoder(model, target)
    if isinstance(model, LeanDecoder):
        if model.device != device or model.dtype != dtype or model.cos.shape[0] < max_len + MAX_DEPTH:
            raise ValueError(f"{what}: a shared LeanDecoder must match this engine's device, dtype and max_len")
        m = model
    else:
        m = LeanDecoder(model, device, dtype, max_len + MAX_DEPTH, max_len, what=what)
    if target is not None and m.shape.vocab_size != target.shape.vocab_size:
        raise ValueError(f"draft vocab_size {m.shape.vocab_size} != target vocab_size {target.shape.vocab_size}: "
                         f"target and draft must share one vocabulary")
    return m


def caches(target: LeanDecoder, draft: LeanDecoder | None, head: bool, slots: int, max_len: int, scratch: int,
           device: torch.device, dtype: torch.dtype, pool: BlockPool | None) -> tuple:
    """The target's K/V cache (with the features a draft head reads) and the draft's: dense, or paged over the
    pool's one block table."""
    def cache(shape, features: int = 0):
        if pool is None:
            return KVCache(shape.layers, slots, shape.kv_heads, max_len, shape.head_dim, device, dtype, scratch,
                           features=features)
        return PagedKVCache(shape.layers, shape.kv_heads, max_len, shape.head_dim, device, dtype, scratch, features,
                            pool.table, pool.blocks, pool.block)

    return cache(target.shape, target.shape.hidden if head else 0), None if draft is None else cache(draft.shape)
