"""The speculative generation engine: continuous batching over per-sample KV slots, tree drafting,
one-pass tree verification and lossless acceptance. No Ray inside; `actors/` wraps it.

Cache invariants per live sample with n committed tokens: the target cache holds K/V of tokens[:n-1] (the
last committed token is the root of the next verify); the draft cache holds tokens[:dlen], dlen <= n, and
catches up on tokens[dlen:n] at the start of each drafting step.

A step is a few stages (`_stage_*`): the draft's catch-up with the tree's first level, one stage per further
level, the verify (target forward, acceptance, commit), or one plain stage. Each stage reads and writes
preallocated device buffers only, with shapes fixed by its arguments: no host reads inside, so on CUDA each
runs as a captured graph (`drafting.graphs`), on CPU as the eager call of the same function. The host learns
what a step did from one copy at its end (emitted tokens, counts, finish flags) and keeps its own mirrors of
the per-sample lengths, so the next step's shape is decided without reading the device."""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np
import torch

from drafting.spec.accept import walk
from drafting.model.attention import resolve_backend
from drafting.runtime.graphs import GraphRunner, batch_bucket, pow2_bucket
from drafting.model.head import DraftHead, HeadDecoder, is_head_dir
from drafting.runtime.kv_cache import KVCache
from drafting.model.decoder import LeanDecoder, compiled_ops
from drafting.spec.noise import GumbelScheme, block_size, position_keys
from drafting.records import EngineStats, GenOutput, GenRequest, KVRange, SampleState, SamplingParams
from drafting.spec.sampling import as_int64, derive_seed, process_logits
from drafting.policy.strategy import DraftStrategy, StepShape, StepView, parse_strategy
from drafting.spec.tree import TreeDrafter, close_under_ancestors, top_per_sample, verify_tree

MAX_DEPTH = 64  # RoPE table headroom beyond max_len for draft/verify node positions
MIN_SCRATCH = 64  # cache columns past max_len for a step's tree nodes (and catch-up widths a graph covers)
OUT_EXTRA = 4  # per-row output columns after the emitted tokens: drafted, accepted, emitted, finish code
FINISH = {1: "stop", 2: "length"}


def scratch_columns(strategy: str | DraftStrategy) -> int:
    """Cache columns past max_len for a step's tree nodes that an engine built with this strategy keeps (node i
    of a sample's tree sits at its committed length + i): the strategy's most nodes, at least MIN_SCRATCH."""
    s = None if isinstance(strategy, str) and strategy.strip().lower() == "adaptive" else parse_strategy(strategy)
    return max(MIN_SCRATCH, s.pool + 1 if s is not None and s.max_depth else 0)


@dataclass(frozen=True)
class Flags:
    """What the live rows' sampling needs this step (part of a stage's graph key)."""

    sampled: bool  # some row samples (Gumbel noise needed)
    top_k: bool
    top_p: bool


class StageClock:
    """Stage timings: CUDA events on a GPU (read after the step's one sync), the host clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a


class SpeculativeEngine:
    """Target + draft decoders with `max_slots` KV slots each; requests beyond capacity wait in a FIFO."""

    def __init__(self, target, draft=None, strategy: str | DraftStrategy = "tree:4,2,16", max_slots: int = 64,
                 max_len: int = 256, device="cpu", dtype: torch.dtype = torch.float32,
                 eos_token_id: int | Sequence[int] | None = None, node_log_steps: int = 256,
                 calibration=None, step_log_steps: int = 100000, attention: str = "auto",
                 cuda_graphs: bool = True, compile: bool | None = None, adaptive_mode: str = "auto"):
        """calibration (needed by strategy 'adaptive'): a calibration file path, 'auto' (the cached profile of
        this model pair here, profiled on first use), or a `Calibration`. attention: 'auto' | 'sdpa' | 'triton'
        (`drafting.attention`). cuda_graphs, compile (torch.compile'd norms, RoPE, activations; None: on CUDA):
        the GPU path (ignored on CPU, which stays eager and exact).
        adaptive_mode: 'host' (per-level decisions from the tree's scores, read each level), 'device' (the step's
        shape from the previous steps' statistics, nodes scored and chosen on the device: no reads inside a
        step) or 'auto' (device on CUDA, host on CPU)."""
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        if adaptive_mode not in ("auto", "host", "device"):
            raise ValueError(f"adaptive_mode {adaptive_mode!r}: want 'auto', 'host' or 'device'")
        self.device = torch.device(device)
        self.max_slots, self.max_len = max_slots, max_len
        self.adaptive_mode = adaptive_mode if adaptive_mode != "auto" else (
            "device" if self.device.type == "cuda" else "host")
        self.target = self._decoder(target, dtype, "target")
        self.draft = None if draft is None else self._decoder(draft, dtype, "draft")
        self.head = isinstance(self.draft, HeadDecoder)  # an EAGLE-style head: it reads the target's features
        self.keep_features = False  # with a head: outputs carry the target's features (a head's training data)
        for m in (self.target, self.draft):
            if m is not None:
                m.attention = resolve_backend(attention, self.device, m.shape.head_dim)
        if (compile is None or compile) and self.device.type == "cuda":
            for m in (self.target, self.draft):
                if m is not None:
                    m.ops = compiled_ops()
        V = self.target.shape.vocab_size
        if self.draft is not None and self.draft.shape.vocab_size != V:
            raise ValueError(f"draft vocab_size {self.draft.shape.vocab_size} != target vocab_size {V}: "
                             f"target and draft must share one vocabulary")
        self.eos = self._eos_tensor(eos_token_id)
        self.block = block_size(V)  # noise block of two-level Gumbel-max (the whole vocabulary when small)
        self.scheme = GumbelScheme()
        self.dtype = dtype
        self.scratch = scratch_columns(strategy)
        ts = self.target.shape
        self.tcache = KVCache(ts.layers, max_slots, ts.kv_heads, max_len, ts.head_dim, self.device, dtype,
                              self.scratch, features=ts.hidden if self.head else 0)
        self.dcache = None
        if self.draft is not None:
            ds = self.draft.shape
            self.dcache = KVCache(ds.layers, max_slots, ds.kv_heads, max_len, ds.head_dim, self.device, dtype,
                                  self.scratch)
        self.drafter: TreeDrafter | None = None
        self.calibration_spec, self.calibration = calibration, None
        self.strategy = parse_strategy("none")
        self.graphs = GraphRunner(self.device, cuda_graphs)
        self.clock = StageClock(self.device)

        S, L, dev = max_slots, max_len + 1, self.device
        z = lambda *shape, dt=torch.long: torch.zeros(*shape, dtype=dt, device=dev)  # noqa: E731
        # per-row device state; rows 0..B-1 are the live samples, the others inert (see _make_inert)
        self.rows = {
            "tokens": z(S, L), "n": z(S), "dlen": z(S), "plen": z(S), "max_new": z(S),
            "temp": z(S, dt=torch.float32), "top_k": z(S), "top_p": z(S, dt=torch.float64),
            "greedy": z(S, dt=torch.bool), "seed": z(S),
        }
        # host mirrors: what the step loop decides shapes and builds outputs from, without reading the device
        self.h_tokens = np.zeros((S, L), dtype=np.int64)
        self.h_logp = np.zeros((S, L), dtype=np.float32)
        self.h = {k: np.zeros(S, dtype=np.int64) for k in ("n", "dlen", "plen", "max_new", "steps", "drafted",
                                                          "accepted")}
        # what a step hands back: emitted tokens then OUT_EXTRA counts per row, and the tokens' log-probs
        W = MAX_DEPTH + 1
        self.out_tok, self.out_lp = z(S, W + OUT_EXTRA), z(S, W, dt=torch.float32)
        self.chosen = z(S, self.scratch, dt=torch.bool)  # host-mode selection, handed to the verify stage
        self.tree_size = z(1)  # nodes in this step's draft tree, written by the drafting stages
        # the verify stage's node records (features, accepted, tested, predicted): the acceptance predictor's data
        self.rec_feats, self.rec_pred = z(S, self.scratch, 6, dt=torch.float32), z(S, self.scratch, dt=torch.float32)
        self.rec_acc, self.rec_tested = z(S, self.scratch, dt=torch.bool), z(S, self.scratch, dt=torch.bool)
        if self.device.type == "cuda":
            self.h_out_tok = torch.empty(self.out_tok.shape, dtype=torch.long, pin_memory=True)
            self.h_out_lp = torch.empty(self.out_lp.shape, dtype=torch.float32, pin_memory=True)
        self._make_inert(slice(None))
        self.live: list[GenRequest] = []  # request of each live row
        self.row_of: dict[Hashable, int] = {}
        self.queue: collections.deque[GenRequest] = collections.deque()
        self.queued_ids: set = set()
        self.reserved = 0  # slots held for incoming migrations: admission of queued requests leaves them free
        self.node_log: collections.deque = collections.deque(maxlen=node_log_steps)
        self.step_log: collections.deque = collections.deque(maxlen=step_log_steps)  # one dict per step
        self._n_top_k = self._n_top_p = self._n_sampled = 0
        self.reset_stats()
        self.set_strategy(strategy)

    # ---- configuration -------------------------------------------------------------------------------------
    def _decoder(self, model, dtype: torch.dtype, what: str) -> LeanDecoder:
        """A path or HF model becomes a LeanDecoder here; a LeanDecoder (of another engine) is shared as it is. A
        draft head (its directory, a `DraftHead`) becomes a HeadDecoder over this engine's target."""
        if what == "draft" and (is_head_dir(model) or isinstance(model, (DraftHead, HeadDecoder))):
            if isinstance(model, HeadDecoder):
                if model.target is not self.target:
                    raise ValueError("draft: a shared HeadDecoder must read this engine's target")
                return model
            return HeadDecoder(model, self.target)
        if isinstance(model, LeanDecoder):
            if model.device != self.device or model.dtype != dtype or model.cos.shape[0] < self.max_len + MAX_DEPTH:
                raise ValueError(f"{what}: a shared LeanDecoder must match this engine's device, dtype and max_len")
            return model
        return LeanDecoder(model, self.device, dtype, self.max_len + MAX_DEPTH, self.max_len, what=what)

    def _eos_tensor(self, eos) -> torch.Tensor | None:
        if eos is None:
            eos = getattr(self.target.generation_config, "eos_token_id", None)
            if eos is None:
                eos = getattr(self.target.config, "eos_token_id", None)
        if eos is None:
            return None
        ids = [eos] if isinstance(eos, int) else list(eos)
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def set_strategy(self, strategy: str | DraftStrategy) -> None:
        """Switch the draft strategy between steps (live samples carry on)."""
        if isinstance(strategy, str) and strategy.strip().lower() == "adaptive":
            from drafting.policy.adaptive import AdaptiveStrategy

            if self.draft is None:
                raise ValueError("strategy 'adaptive' needs a draft model (draft=None)")
            strategy = AdaptiveStrategy(self.load_calibration(), mode=self.adaptive_mode)
        s = parse_strategy(strategy)
        if s.max_depth > 0 and self.draft is None:
            raise ValueError(f"strategy {s.name!r} needs a draft model (draft=None)")
        if s.max_depth >= MAX_DEPTH:
            raise ValueError(f"strategy {s.name!r}: depth {s.max_depth} must be < {MAX_DEPTH}")
        if s.max_depth > 0 and s.topk > self.target.shape.vocab_size:
            raise ValueError(f"strategy {s.name!r}: topk {s.topk} exceeds the vocabulary size")
        if s.max_depth > 0 and s.pool >= self.scratch:
            raise ValueError(f"strategy {s.name!r} drafts up to {s.pool} nodes per sample; this engine was built "
                             f"with room for {self.scratch - 1} (pass the largest strategy at construction)")
        self.strategy = s
        if s.max_depth > 0 and self.drafter is None:
            self.drafter = TreeDrafter(self.draft, self.max_slots, self.scratch, self.scheme,
                                       features=self.draft.shape.hidden if self.head else 0)

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
        """The draft's weights changed: acceptance records made with the old draft no longer describe it, and
        the acceptance predictor refits on new ones."""
        self.node_log.clear()
        self.strategy.reset()

    # ---- calibration ---------------------------------------------------------------------------------------
    def calibration_key(self) -> dict:
        from drafting.policy.calibration import calibration_key

        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
        return calibration_key(self.target.config, self.draft.config if self.draft else None, str(self.dtype),
                               device, torch.get_num_threads())

    def load_calibration(self):
        """The calibration this engine's adaptive strategy and the load balancer use (see __init__)."""
        if self.calibration is None:
            if self.calibration_spec is None:
                raise ValueError("strategy 'adaptive' needs a calibration: a file from `python -m drafting.profile`"
                                 " or calibration='auto'")
            from drafting.calibrate.first_use import resolve_calibration

            self.calibration = resolve_calibration(self, self.calibration_spec)
        return self.calibration

    @property
    def saturation_live(self) -> int | None:
        """Live samples where plain decoding's throughput stops growing (the roofline's saturation point)."""
        if self.calibration is None and self.calibration_spec is not None:
            self.load_calibration()
        return None if self.calibration is None else self.calibration.saturation_live

    # ---- requests ------------------------------------------------------------------------------------------
    def add(self, request: GenRequest) -> None:
        """Queue a request; it joins the batch at the next step with a free slot."""
        rid = request.request_id
        if rid in self.row_of or rid in self.queued_ids:
            raise ValueError(f"request {rid!r} is already in this engine")
        p = request.prompt_token_ids
        if len(p) == 0:
            raise ValueError(f"request {rid!r}: empty prompt")
        if len(p) > self.max_len - 1:
            raise ValueError(f"request {rid!r}: prompt has {len(p)} tokens, more than max_len - 1 = {self.max_len - 1}")
        V = self.target.shape.vocab_size
        if min(p) < 0 or max(p) >= V:
            raise ValueError(f"request {rid!r}: prompt token ids must be in [0, {V})")
        request.sampling.validate(f"request {rid!r} sampling")
        if request.sampling.seed is None:
            request.sampling.seed = int(torch.randint(0, 2**62, (1,)).item())
        self.queue.append(request)
        self.queued_ids.add(rid)

    def remove(self, request_id: Hashable) -> None:
        """Drop a queued or live request (e.g. after a migration was confirmed); its slot frees at once."""
        if request_id in self.row_of:
            self._free_row(self.row_of[request_id])
            return
        if request_id in self.queued_ids:
            self.queue.remove(next(r for r in self.queue if r.request_id == request_id))
            self.queued_ids.discard(request_id)
            return
        raise KeyError(f"request {request_id!r} is not in this engine")

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[GenOutput]:
        """Run prompts to completion; outputs in prompt order. One shared SamplingParams with a seed gives each
        prompt its own derived seed (equal prompts then still sample independently)."""
        sampling = sampling if sampling is not None else SamplingParams()
        if isinstance(sampling, SamplingParams):
            params = [SamplingParams(**{**vars(sampling),
                                        "seed": None if sampling.seed is None else derive_seed(sampling.seed, i)})
                      for i in range(len(prompts))]
        else:
            if len(sampling) != len(prompts):
                raise ValueError(f"sampling: {len(sampling)} SamplingParams for {len(prompts)} prompts")
            params = [SamplingParams(**vars(s)) for s in sampling]
        self._gen_calls = getattr(self, "_gen_calls", 0) + 1
        ids = [("generate", self._gen_calls, i) for i in range(len(prompts))]
        for rid, p, sp in zip(ids, prompts, params):
            self.add(GenRequest(rid, list(p), sp))
        done: dict = {}
        wanted = set(ids)
        while len(done) < len(ids):
            for out in self.step():
                if out.request_id in wanted:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    # ---- the step loop -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[GenOutput]:
        """Admit queued requests into free slots, advance every live sample by one draft/verify step (or one
        plain token); returns the samples that finished (their slots are already free)."""
        t0 = time.perf_counter()
        self._admit()
        if not self.live:
            return []
        B, h = len(self.live), self.h
        view = StepView(B, int(h["n"][:B].max()), int((h["n"][:B] - h["dlen"][:B]).max()), self.rows["temp"][:B])
        self._log = log = {"live": B, "ctx": view.context, "lag": view.draft_lag, "t_admit": time.perf_counter() - t0}
        s = self.strategy
        t1 = time.perf_counter()
        shape = None
        if s.host_decisions:
            draft = s.plan(view)
        else:
            shape = s.plan_shape(view)
            draft = shape is not None
        log["t_policy"] = time.perf_counter() - t1
        W = self._step_speculative(view, shape) if draft else self._step_plain(view)
        out = self._collect(B, W)
        dt = time.perf_counter() - t0
        self._time += dt
        log["t_total"] = dt
        decision = getattr(s, "decision", None)
        if decision:
            log.update({f"plan_{k}": v for k, v in decision.items()})
        self.step_log.append(log)
        t = time.perf_counter()
        s.step_done(log)
        log["t_policy"] += time.perf_counter() - t
        return out

    def _flags(self) -> Flags:
        return Flags(self._n_sampled > 0, self._n_top_k > 0, self._n_top_p > 0)

    def _rows_for(self, B: int, capturable: bool = True) -> tuple[int, bool]:
        """Rows a stage runs over and whether it runs as a graph: graphs cover a bucket of rows."""
        graphed = self.graphs.enabled and capturable
        return batch_bucket(B, self.max_slots, graphed), graphed

    def _kv_len(self, needed: int, graphed: bool) -> int:
        """Columns attention may read: all of them under a graph (fixed at capture; the Triton kernel still
        reads each row only to its own length), what the rows need when eager."""
        return self.tcache.columns if graphed else min(max(needed, 1), self.tcache.columns)

    def _step_plain(self, view: StepView) -> int:
        """One target token per sample; the draft cache catches up at the next drafting step."""
        Bb, graphed = self._rows_for(view.live)
        kv_len, flags = self._kv_len(view.context, graphed), self._flags()
        a = self.clock.mark()
        self.graphs.run(("plain", Bb, kv_len, flags), lambda: self._stage_plain(Bb, kv_len, flags),
                        capturable=graphed)
        self._marks = [("plain", a, self.clock.mark())]
        self._log.update({"plain": True, "levels": 0, "nodes": 0})
        return 1

    def _step_speculative(self, view: StepView, shape: StepShape | None) -> int:
        """Catch-up + first level, further levels, verify. With host decisions the strategy reads the tree
        between levels (eager); otherwise `shape` fixes everything and every stage can be a graph."""
        B, s, h, clock = view.live, self.strategy, self.h, self.clock
        host = s.host_decisions
        Bb, graphed = self._rows_for(B, capturable=not host)
        flags, k, ctx = self._flags(), s.topk, view.context
        # 1. the draft catches up on committed tokens it has not seen, then the tree's first level
        lag = view.draft_lag
        W = pow2_bucket(lag) if graphed and lag <= MIN_SCRATCH else lag
        kv_len = self._kv_len(int((h["dlen"][:B] + W).max()), graphed and W <= MIN_SCRATCH)
        self._log["t_levels"] = []
        a = clock.mark()
        self.graphs.run(("root", Bb, W, kv_len, k, flags, s.kind),
                        lambda: self._stage_root(Bb, W, kv_len, k, flags), capturable=graphed and W <= MIN_SCRATCH)
        marks = [("root", a, clock.mark())]
        h["dlen"][:B] = h["n"][:B]
        # 2. more levels while the strategy wants them
        levels, size, newest, widths = 1, k, k, []
        t_policy = 0.0
        while True:
            t = time.perf_counter()
            width = s.next_width(view, shape, levels, newest, lambda: self.drafter.view(B, size))
            t_policy += time.perf_counter() - t
            if not width:
                break
            kv_len = self._kv_len(ctx + size, graphed)
            a = clock.mark()
            self.graphs.run(("level", Bb, size, newest, levels, width, k, kv_len, flags, s.kind),
                            lambda: self._stage_level(Bb, size, newest, levels, width, k, kv_len, flags),
                            capturable=graphed)
            marks.append(("level", a, clock.mark()))
            widths.append(width)
            size, newest, levels = size + width * k, width * k, levels + 1
        # 3. the nodes to verify, then one target forward over all of them, acceptance and commit
        t = time.perf_counter()
        if host:
            tree = self.drafter.view(B, size)
            chosen = close_under_ancestors(tree, s.select(tree, view))
            counts = chosen.sum(1)
            T = 1 + int(counts.max())
            self.chosen[:B, :size] = chosen
        else:
            T = 1 + min(shape.nodes, size)
        self._log["t_policy"] += t_policy + time.perf_counter() - t
        # on the device path the verify sees every node slot (the tree's size is on the device), so its graph
        # depends on (rows, width) only, not on the tree's shape
        depth = levels if host else s.max_depth
        kv_len = self._kv_len(ctx - 1 + T, graphed)
        a = clock.mark()
        key = ("verify", Bb, T, kv_len, k, flags, s.kind) + ((size, levels) if host else (depth,))
        self.graphs.run(key, lambda: self._stage_verify(Bb, T, size if host else None, depth, k, kv_len, flags),
                        capturable=graphed)
        marks.append(("verify", a, clock.mark()))
        self._marks = marks
        self._log.update({"plain": False, "levels": levels, "level_widths": widths, "width": T,
                          "nodes": B * (T - 1) if not host else int(counts.sum())})
        return depth + 1

    # ---- stages: device work only, shapes fixed by the arguments (captured as CUDA graphs on a GPU) ------
    def _stage_plain(self, Bb: int, kv_len: int, flags: Flags) -> None:
        r = self.rows
        n = r["n"][:Bb]
        root = r["tokens"][:Bb].gather(1, (n - 1)[:, None])  # [Bb, 1]
        logits = self._append(self.target, self.tcache, slice(0, Bb), n - 1, torch.ones_like(n), root, kv_len,
                              want_logits=True)[:, 0]
        tok, lp = self._target_tokens(logits, torch.arange(Bb, device=self.device), n, flags)
        allowed, finish = self._commit(tok[:, None], torch.ones_like(n), lp[:, None])
        zero = torch.zeros_like(n)
        self._write_outputs(tok[:, None], lp[:, None], zero, zero, allowed, finish)

    def _stage_root(self, Bb: int, W: int, kv_len: int, k: int, flags: Flags) -> None:
        r = self.rows
        n, dlen = r["n"][:Bb], r["dlen"][:Bb]
        pend_idx = (dlen[:, None] + torch.arange(W, device=self.device)).clamp(max=self.max_len)
        pending = r["tokens"][:Bb].gather(1, pend_idx)  # [Bb, W]
        root_logits = self._append(self.draft, self.dcache, slice(0, Bb), dlen, n - dlen, pending, kv_len,
                                   want_logits=True)  # [Bb, 1, V]
        if self.head:  # the head's feature at the root (position n - 1): what its children read
            root_logits, self.drafter.feat[:Bb, 0] = root_logits[0], root_logits[1][:, 0]
        r["dlen"][:Bb] = n
        self.drafter.start(Bb, self._draft_probs(root_logits, Bb, flags), n, r["seed"][:Bb], r["greedy"][:Bb], k,
                           self.block, flags.sampled)
        self.tree_size.fill_(k)
        self.strategy.score_nodes(self.drafter, Bb, 0, k, r["temp"][:Bb])

    def _stage_level(self, Bb: int, size: int, newest: int, level: int, width: int, k: int, kv_len: int,
                     flags: Flags) -> None:
        r = self.rows
        self.drafter.grow(Bb, size, newest, level, width, k, self.dcache, r["n"][:Bb], r["seed"][:Bb],
                          r["greedy"][:Bb], lambda lg: self._draft_probs(lg, Bb, flags), self.block, flags.sampled,
                          kv_len)
        self.tree_size.fill_(size + width * k)
        self.strategy.score_nodes(self.drafter, Bb, size, size + width * k, r["temp"][:Bb])

    def _stage_verify(self, Bb: int, T: int, size: int | None, depth: int, k: int, kv_len: int, flags: Flags) -> None:
        """Verify the chosen nodes of every sample in one target forward (tree K/V written right after each row's
        committed columns), walk the tree on the target's own tokens, commit, and move the accepted nodes' K/V
        to their committed columns. size: the tree's nodes, with the host's selection in `self.chosen`; None:
        every node slot, those past the tree's size (`self.tree_size`, on the device) masked, and each sample
        verifies its T - 1 best nodes. depth: the deepest level the walk may accept."""
        r, dev = self.rows, self.device
        n = r["n"][:Bb]
        host = size is not None
        if host:
            tree = self.drafter.view(Bb, size)
            chosen = self.chosen[:Bb, :size]
        else:
            tree = self.drafter.view(Bb, self.drafter.max_nodes)
            stale = torch.arange(tree.size, device=dev) >= self.tree_size  # slots past this step's tree
            tree.score.masked_fill_(stale, float("-inf"))
            chosen = close_under_ancestors(tree, top_per_sample(tree.score, T - 1))
        root = r["tokens"][:Bb].gather(1, (n - 1)[:, None]).squeeze(1)
        vt = verify_tree(tree, chosen, root, k, width=T)
        t = torch.arange(T, device=dev)
        logits = self.target.forward(vt.tokens, (n - 1)[:, None] + vt.depth, self.tcache, slice(0, Bb),
                                     write_pos=(n - 1)[:, None] + t, prefix=n - 1, tail=vt.mask, kv_len=kv_len,
                                     valid=vt.valid if host else None)
        # the target's own token at every verified node (noise keyed by position), then the walk
        if host:  # packed: real nodes only, row-major
            rows, nodes = vt.valid.nonzero(as_tuple=True)
        else:
            rows = torch.arange(Bb, device=dev).repeat_interleave(T, output_size=Bb * T)
            nodes, logits = t.repeat(Bb), logits.reshape(Bb * T, -1)
        ch = vt.children[rows, nodes]
        ch_tok = torch.where(ch >= 0, vt.tokens[rows].gather(1, ch.clamp(min=0)), -1)
        tok, lp = self._target_tokens(logits, rows, n[rows] + vt.depth[rows, nodes], flags, ch_tok)
        target = torch.zeros_like(vt.tokens)
        target[rows, nodes] = tok
        node_logp = torch.zeros(Bb, T, device=dev)
        node_logp[rows, nodes] = lp
        acc = walk(vt, target, depth)
        logp = node_logp.gather(1, acc.at)
        n_old = n.clone()
        allowed, finish = self._commit(acc.tokens, acc.count, logp)
        # the accepted path's target K/V: node path[j] sits at column n - 1 + path[j], belongs at n + j
        j = torch.arange(acc.path.shape[1], device=dev)
        dst = torch.where(j < (allowed - 1)[:, None], n_old[:, None] + j, self.tcache.trash)
        self.tcache.move_columns(torch.arange(Bb, device=dev)[:, None], n_old[:, None] - 1 + acc.path, dst)
        self._record(tree, vt, acc)
        self.strategy.summarize(tree, vt, acc, r["max_new"][:Bb] > 0, depth)
        self._write_outputs(acc.tokens, logp, vt.counts, acc.count - 1, allowed, finish)

    # ---- pieces of the stages ------------------------------------------------------------------------------
    def _append(self, model: LeanDecoder, cache: KVCache, rows: slice, start: torch.Tensor, width: torch.Tensor,
                tokens: torch.Tensor, kv_len: int, want_logits: bool = False) -> torch.Tensor | None:
        """Ragged forward: row b appends tokens[b, :width[b]] at cache columns start[b]..; padded tokens go to the
        trash column. Returns logits at each row's last real token [B, 1, V] if asked."""
        B, W = tokens.shape
        t = torch.arange(W, device=self.device)[None, :]
        real = t < width[:, None]
        positions = torch.where(real, start[:, None] + t, torch.zeros_like(t))
        write_pos = torch.where(real, start[:, None] + t, torch.full_like(t, cache.trash))
        # a real token sees its row's earlier tokens and itself; a padded one what the row's last real one sees
        # (an empty row sees one column, so that no query attends to nothing)
        last = torch.minimum(t, (width - 1).clamp(min=0)[:, None])  # [B, W]
        tail = torch.arange(W, device=self.device)[None, None, :] <= last[:, :, None]  # [B, W, W]
        at = (width - 1).clamp(min=0)[:, None] if want_logits else None
        if model is self.draft and self.head:  # each token reads the target's feature at the position before it
            prev = self.tcache.feat[0, rows, 0].gather(1, (positions - 1).clamp(min=0)[..., None].expand(
                B, W, self.tcache.feat.shape[-1]))  # [B, W, H]
            prev = prev * (positions > 0)[..., None]
            return model.forward(tokens, positions, cache, rows, write_pos=write_pos, prefix=start, tail=tail,
                                 kv_len=kv_len, logits_at=at, want_logits=want_logits, feats=prev,
                                 return_hidden=want_logits)
        return model.forward(tokens, positions, cache, rows, write_pos=write_pos, prefix=start, tail=tail,
                             kv_len=kv_len, logits_at=at, want_logits=want_logits)

    def _target_tokens(self, logits: torch.Tensor, rows: torch.Tensor, position: torch.Tensor, flags: Flags,
                       children: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's token and its log-prob for M distributions: logits [M, V] of rows `rows` [M] for token
        index position [M] (children [M, K]: the drafted candidates there). Greedy rows take the argmax;
        sampled rows the position-keyed Gumbel-max of the processed distribution."""
        r = self.rows
        probs = process_logits(logits, r["temp"][rows], r["top_k"][rows], r["top_p"][rows],
                               use_top_k=flags.top_k, use_top_p=flags.top_p)  # [M, V]
        tok = logits.argmax(-1)
        if flags.sampled:
            keys = position_keys(r["seed"][rows], position)
            tok = torch.where(r["greedy"][rows], tok, self.scheme.token(probs, keys, children, self.block))
        return tok, probs.gather(1, tok[:, None]).squeeze(1).log()

    def _draft_probs(self, logits: torch.Tensor, B: int, flags: Flags) -> torch.Tensor:
        """The draft's distributions [B * w, V] for logits [B, w, V], processed with each row's sampling params
        (the draft mimics what the target samples from, which is what couples their choices)."""
        r, w = self.rows, logits.shape[1]
        rep = (lambda x: x[:B].repeat_interleave(w, output_size=B * w)) if w > 1 else (lambda x: x[:B])  # noqa
        return process_logits(logits.reshape(B * w, -1), rep(r["temp"]), rep(r["top_k"]), rep(r["top_p"]),
                              use_top_k=flags.top_k, use_top_p=flags.top_p)

    def _commit(self, new_tok: torch.Tensor, count: torch.Tensor, logp: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append up to count[b] tokens of new_tok [B, W], cut after the first EOS, at max_new_tokens and at
        max_len. Returns the number appended per sample [B] and its finish code (0 running, 1 EOS, 2 length)."""
        B, W = new_tok.shape
        r = self.rows
        n = r["n"][:B]
        limit = torch.minimum(r["max_new"][:B] - (n - r["plen"][:B]), self.max_len - n)
        allowed = torch.minimum(count, limit)
        j = torch.arange(W, device=self.device)[None, :]
        stop = torch.zeros_like(n, dtype=torch.bool)
        if self.eos is not None:
            is_eos = torch.isin(new_tok, self.eos) & (j < allowed[:, None])
            stop = is_eos.any(1)
            allowed = torch.where(stop, is_eos.to(torch.int8).argmax(1) + 1, allowed)
        pos = torch.where(j < allowed[:, None], n[:, None] + j, self.max_len)  # max_len = trash column
        r["tokens"][torch.arange(B, device=self.device)[:, None], pos] = new_tok
        n_new = n + allowed
        r["n"][:B] = n_new
        length = (n_new - r["plen"][:B] >= r["max_new"][:B]) | (n_new >= self.max_len)
        finish = torch.where(stop, 1, torch.where(length, 2, 0))
        return allowed, finish

    def _write_outputs(self, tokens: torch.Tensor, logp: torch.Tensor, drafted: torch.Tensor,
                       accepted: torch.Tensor, emitted: torch.Tensor, finish: torch.Tensor) -> None:
        B, W = tokens.shape
        self.out_tok[:B, :W] = tokens
        self.out_tok[:B, -OUT_EXTRA:] = torch.stack([drafted, accepted, emitted, finish], dim=1)
        self.out_lp[:B, :W] = logp

    def _record(self, tree, vt, acc) -> None:
        """Every verified node's features, whether it was accepted, and whether it was tested (its parent
        accepted): the acceptance predictor's data, read by the host only when it wants them."""
        B, T = vt.tokens.shape
        node = vt.node  # [B, T - 1] draft-tree index
        par = tree.parents.gather(1, node)  # [B, T - 1], -1 = root
        on_path_by_node = torch.zeros(B, tree.size + 1, dtype=torch.bool, device=self.device)
        on_path_by_node.scatter_(1, torch.where(vt.valid[:, 1:], node, tree.size), acc.on_path[:, 1:])
        parent_ok = torch.where(par < 0, torch.ones_like(par, dtype=torch.bool),
                                on_path_by_node.gather(1, par.clamp(min=0)))
        temp = self.rows["temp"][:B, None].expand_as(node)
        self.rec_feats[:B, :T - 1] = torch.stack(
            [tree.value.gather(1, node), tree.q.gather(1, node), tree.margin.gather(1, node),
             tree.depth[node].float(), tree.rank[node].float(), temp.float()], dim=-1)
        self.rec_acc[:B, :T - 1] = acc.on_path[:, 1:]
        self.rec_tested[:B, :T - 1] = vt.valid[:, 1:] & parent_ok
        self.rec_pred[:B, :T - 1] = tree.cond.gather(1, node)

    # ---- the step's one read, and the host's bookkeeping ---------------------------------------------------
    def _collect(self, B: int, W: int) -> list[GenOutput]:
        """Bring back what the step emitted (one copy, one wait), update the host mirrors and the strategy,
        and free the finished samples' slots."""
        log, s = self._log, self.strategy
        records = W > 1 and (s.wants_records() or self.device.type != "cuda")  # CPU: the node log, as ever
        t0 = time.perf_counter()
        out, lp = self._fetch(B, W, records)
        log["t_sync"] = time.perf_counter() - t0
        for name, a, b in self._marks:  # stage timings: t_root, t_levels, t_verify or t_plain
            if name == "level":
                log["t_levels"].append(self.clock.seconds(a, b))
            else:
                log[f"t_{name}"] = self.clock.seconds(a, b)
        drafted, accepted, emitted, finish = (out[:, W + i] for i in range(OUT_EXTRA))
        h, rows = self.h, np.arange(B)
        j = np.arange(W)
        pos = np.where(j[None, :] < emitted[:, None], h["n"][:B, None] + j, self.max_len)
        self.h_tokens[rows[:, None], pos] = out[:, :W]
        self.h_logp[rows[:, None], pos] = lp
        h["n"][:B] += emitted
        h["steps"][:B] += 1
        h["drafted"][:B] += drafted
        h["accepted"][:B] += accepted
        self._steps += 1
        self._sample_steps += B
        self._accepted += int(accepted.sum())
        self._tokens += int(emitted.sum())
        log["accepted"] = int(accepted.sum())
        if records:
            self._observe(B)
        done = np.nonzero(finish)[0]
        outs = [self._output(b, FINISH[int(finish[b])]) for b in done]
        for b in sorted(done.tolist(), reverse=True):  # descending: the row moved into a hole is never finished
            self._free_row(b)
        return outs

    def _fetch(self, B: int, W: int, records: bool) -> tuple[np.ndarray, np.ndarray]:
        """The step's outputs on the host: on CUDA non-blocking copies into pinned buffers and one wait."""
        cols = list(range(W)) + list(range(self.out_tok.shape[1] - OUT_EXTRA, self.out_tok.shape[1]))
        self.strategy.fetch_async()
        if self.device.type != "cuda":
            return self.out_tok[:B, cols].numpy(), self.out_lp[:B, :W].numpy()
        self.h_out_tok[:B].copy_(self.out_tok[:B], non_blocking=True)
        self.h_out_lp[:B, :W].copy_(self.out_lp[:B, :W], non_blocking=True)
        if records:
            self._rec_host = [t[:B].to("cpu", non_blocking=True)
                              for t in (self.rec_feats, self.rec_acc, self.rec_tested, self.rec_pred)]
        torch.cuda.current_stream(self.device).synchronize()
        return self.h_out_tok[:B, cols].numpy(), self.h_out_lp[:B, :W].numpy()

    def _observe(self, B: int) -> None:
        """Hand the tested nodes' records to the node log and the strategy."""
        T1 = self._log["width"] - 1
        if self.device.type == "cuda":
            feats, acc, tested, pred = (t[:, :T1] for t in self._rec_host)
        else:
            feats, acc, tested, pred = (t[:B, :T1] for t in (self.rec_feats, self.rec_acc, self.rec_tested,
                                                              self.rec_pred))
        if not bool(tested.any()):
            return
        feats, acc, pred = feats[tested], acc[tested], pred[tested]  # copies (boolean indexing)
        self.node_log.append((feats, acc))
        t = time.perf_counter()
        self.strategy.observe({"features": feats, "accepted": acc, "predicted": pred})
        self._log["t_policy"] += time.perf_counter() - t

    def _output(self, row: int, reason: str) -> GenOutput:
        req, h = self.live[row], self.h
        n, plen = int(h["n"][row]), int(h["plen"][row])
        toks = self.h_tokens[row, :n].tolist()
        stats = {k: int(h[k][row]) for k in ("steps", "drafted", "accepted")}
        lp = self.h_logp[row, plen:n].tolist() if req.sampling.logprobs else None
        feats = self.tcache.feat[0, row, 0, :n - 1].clone() if self.keep_features and self.head else None
        return GenOutput(req.request_id, toks[:plen], toks[plen:], reason, stats, lp, feats)

    # ---- slots ---------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Move queued requests into free slots (FIFO) and prefill them as one ragged batch."""
        new = []
        while self.queue and len(self.live) + len(new) + self.reserved < self.max_slots:
            new.append(self.queue.popleft())
            self.queued_ids.discard(new[-1].request_id)
        if not new:
            return
        # rows in prompt-length order, so prefill groups of similar lengths waste little on padding
        new.sort(key=lambda q: len(q.prompt_token_ids))
        B0 = len(self.live)
        self._set_rows(B0, [(q.prompt_token_ids, [], q.sampling, as_int64(q.sampling.seed), (0, 0, 0), None,
                             len(q.prompt_token_ids) - 1) for q in new])
        for req in new:
            self.row_of[req.request_id] = len(self.live)
            self.live.append(req)
        widths = [len(q.prompt_token_ids) - 1 for q in new]
        g0 = 0
        for g1 in range(1, len(new) + 1):
            if g1 < len(new) and widths[g1] * (g1 + 1 - g0) <= 1.25 * sum(widths[g0:g1 + 1]) + 256:
                continue  # row g1 joins the group: padding stays small
            W = max(widths[g1 - 1], 1)
            width = self._to_device(torch.tensor(widths[g0:g1]))
            toks = self.rows["tokens"][B0 + g0:B0 + g1, :W]
            for model, cache in ((self.target, self.tcache), (self.draft, self.dcache)):
                if model is not None:
                    self._append(model, cache, slice(B0 + g0, B0 + g1), torch.zeros_like(width), width, toks,
                                 kv_len=W)
            g0 = g1

    def _set_rows(self, row0: int, samples: list[tuple]) -> None:
        """Rows row0.. take these samples: (prompt, response, sampling, seed, (steps, drafted, accepted),
        logprobs, draft length). One copy per field, not per row."""
        r, h, k = self.rows, self.h, len(samples)
        seqs = [list(p) + list(resp) for p, resp, *_ in samples]
        L = max(len(q) for q in seqs)
        tok = np.zeros((k, L), dtype=np.int64)
        for i, q in enumerate(seqs):
            tok[i, :len(q)] = q
        rows = slice(row0, row0 + k)
        r["tokens"][rows, :L] = self._to_device(tok)
        self.h_tokens[rows, :L] = tok
        self.h_logp[rows] = 0.0
        greedy = [sp.temperature == 0 for _, _, sp, *_ in samples]
        vals = {"n": [len(q) for q in seqs], "dlen": [d for *_, d in samples],
                "plen": [len(p) for p, *_ in samples], "max_new": [sp.max_new_tokens for _, _, sp, *_ in samples],
                "temp": [sp.temperature for _, _, sp, *_ in samples],
                "top_k": [0 if g else sp.top_k for g, (_, _, sp, *_) in zip(greedy, samples)],
                "top_p": [1.0 if g else sp.top_p for g, (_, _, sp, *_) in zip(greedy, samples)],
                "greedy": greedy, "seed": [seed for _, _, _, seed, *_ in samples]}
        for name, v in vals.items():
            r[name][rows] = self._to_device(torch.tensor(v, dtype=r[name].dtype))
            if name in h:
                h[name][rows] = v
        for i, (p, resp, sp, _, counts, logprobs, _) in enumerate(samples):
            h["steps"][row0 + i], h["drafted"][row0 + i], h["accepted"][row0 + i] = counts
            if logprobs:
                self.h_logp[row0 + i, len(p):len(p) + len(resp)] = logprobs
            self._count_params(sp, +1)

    def _to_device(self, x) -> torch.Tensor:
        """A host array onto the device without a host sync (pinned, asynchronous) on CUDA."""
        x = torch.as_tensor(x)
        if self.device.type != "cuda":
            return x
        return x.pin_memory().to(self.device, non_blocking=True)

    def _make_inert(self, row: int | slice) -> None:
        """A free slot's device state: one committed token and nothing left to generate, so stages that run over
        a bucket of rows larger than the live ones commit nothing there."""
        r = self.rows
        r["n"][row], r["dlen"][row], r["plen"][row], r["max_new"][row] = 1, 0, 1, 0
        r["greedy"][row], r["temp"][row], r["top_k"][row], r["top_p"][row] = True, 0.0, 0, 1.0

    def _count_params(self, sp: SamplingParams, sign: int) -> None:
        """Live samples that sample, and that need top-k / top-p: the stages skip what no live row needs."""
        greedy = sp.temperature == 0
        self._n_sampled += sign * int(not greedy)
        self._n_top_k += sign * int(not greedy and sp.top_k > 0)
        self._n_top_p += sign * int(not greedy and sp.top_p < 1.0)

    def _free_row(self, row: int) -> None:
        """Free a slot by moving the last live row into it, keeping live rows dense in 0..B-1."""
        last = len(self.live) - 1
        req = self.live[row]
        self._count_params(req.sampling, -1)
        del self.row_of[req.request_id]
        if row != last:
            r, h = self.rows, self.h
            for t in r.values():
                t[row] = t[last]
            for a in (*h.values(), self.h_tokens, self.h_logp):
                a[row] = a[last]
            self.tcache.move_row(last, row, int(h["n"][row]))
            if self.dcache is not None:
                self.dcache.move_row(last, row, int(h["dlen"][row]))
            self.live[row] = self.live[last]
            self.row_of[self.live[row].request_id] = row
        self._make_inert(last)
        self.live.pop()

    def rewind(self, n: Sequence[int], dlen: Sequence[int]) -> None:
        """Set the first len(n) live rows' committed and draft lengths (profiling reruns a step at one context)."""
        B = len(n)
        n, dlen = np.asarray(n, dtype=np.int64), np.asarray(dlen, dtype=np.int64)
        self.h["n"][:B], self.h["dlen"][:B] = n, dlen
        self.rows["n"][:B] = self._to_device(n)
        self.rows["dlen"][:B] = self._to_device(dlen)

    # ---- migration -----------------------------------------------------------------------------------------
    def _row(self, request_id: Hashable) -> int:
        if request_id not in self.row_of:
            raise KeyError(f"request {request_id!r} is not live in this engine")
        return self.row_of[request_id]

    def sample_loads(self) -> list[tuple[Hashable, int, int, int]]:
        """(request id, committed target KV positions, tokens generated, max_new_tokens) of each live sample:
        what the load balancer ranks samples by when it picks which to move."""
        h = self.h
        return [(q.request_id, int(h["n"][b]) - 1, int(h["n"][b] - h["plen"][b]), int(h["max_new"][b]))
                for b, q in enumerate(self.live)]

    @torch.inference_mode()
    def export_kv(self, request_id: Hashable, start: int, end: int) -> KVRange:
        """Copy of a live sample's committed K/V for positions [start, end) (clipped to what is committed)."""
        row = self._row(request_id)
        tl, dl = int(self.h["n"][row]) - 1, int(self.h["dlen"][row])
        if not 0 <= start <= end:
            raise ValueError(f"export_kv {request_id!r}: bad range [{start}, {end})")
        tk, tv = self.tcache.read(row, start, max(start, min(end, tl)))
        th = self.tcache.read_features(row, start, max(start, min(end, tl)))  # a draft head's features
        dk = dv = None
        if self.dcache is not None:
            dk, dv = self.dcache.read(row, start, max(start, min(end, dl)))
        return KVRange(start, tk, tv, dk, dv, th)

    @torch.inference_mode()
    def export_sample(self, request_id: Hashable, kv_start: int = 0) -> SampleState:
        """Snapshot of a live sample between steps (KV from kv_start on); the sample stays here until removed."""
        row, h = self._row(request_id), self.h
        req = self.live[row]
        n, plen = int(h["n"][row]), int(h["plen"][row])
        kv = self.export_kv(request_id, kv_start, n)
        toks = self.h_tokens[row, :n].tolist()
        return SampleState(
            request_id=req.request_id, prompt_token_ids=toks[:plen], token_ids=toks[plen:],
            sampling=SamplingParams(**vars(req.sampling)), seed=int(self.rows["seed"][row]),
            steps=int(h["steps"][row]), drafted=int(h["drafted"][row]), accepted=int(h["accepted"][row]),
            logprobs=self.h_logp[row, plen:n].tolist() if req.sampling.logprobs else None,
            target_len=n - 1, draft_len=int(h["dlen"][row]), kv_start=kv_start,
            target_k=kv.target_k, target_v=kv.target_v, draft_k=kv.draft_k, draft_v=kv.draft_v, target_h=kv.target_h)

    @torch.inference_mode()
    def import_sample(self, state: SampleState, prefix: Sequence[KVRange] = ()) -> None:
        """Continue an exported sample here; `prefix` ranges (stage 1 copies) plus the state's own KV must
        cover the target's committed positions. Draft K/V not covered is recomputed by the draft."""
        rid = state.request_id
        if rid in self.row_of or rid in self.queued_ids:
            raise ValueError(f"import_sample: request {rid!r} is already in this engine")
        if len(self.live) >= self.max_slots:
            raise RuntimeError(f"import_sample {rid!r}: no free slot (max_slots={self.max_slots})")
        n = len(state.prompt_token_ids) + len(state.token_ids)
        if n > self.max_len - 1:
            raise ValueError(f"import_sample {rid!r}: {n} tokens do not fit max_len={self.max_len}")
        if state.target_len != n - 1:
            raise ValueError(f"import_sample {rid!r}: target_len {state.target_len} != tokens - 1 = {n - 1}")
        ranges = list(prefix) + [KVRange(state.kv_start, state.target_k, state.target_v, state.draft_k, state.draft_v,
                                         state.target_h)]
        covered, d_cov = 0, 0
        row = len(self.live)
        for kr in sorted(ranges, key=lambda x: x.start):
            if kr.start > covered:
                raise ValueError(f"import_sample {rid!r}: target KV gap at positions [{covered}, {kr.start})")
            self.tcache.load(row, kr.start, kr.target_k, kr.target_v)
            if self.tcache.feat is not None:
                if kr.target_h is None:
                    raise ValueError(f"import_sample {rid!r}: this engine's draft head needs the target's features, "
                                     f"and the sample came without (from an engine with a draft model?)")
                self.tcache.load_features(row, kr.start, kr.target_h)
            covered = max(covered, kr.start + kr.target_k.shape[2])
            if self.dcache is not None and kr.draft_k is not None and kr.start <= d_cov:
                self.dcache.load(row, kr.start, kr.draft_k, kr.draft_v)
                d_cov = max(d_cov, kr.start + kr.draft_k.shape[2])
        if covered < state.target_len:
            raise ValueError(f"import_sample {rid!r}: target KV covers [0, {covered}), need [0, {state.target_len})")
        sp = SamplingParams(**vars(state.sampling))
        self._set_rows(row, [(state.prompt_token_ids, state.token_ids, sp, state.seed,
                              (state.steps, state.drafted, state.accepted), state.logprobs,
                              min(d_cov, state.draft_len, n - 1))])
        self.live.append(GenRequest(rid, list(state.prompt_token_ids), sp))
        self.row_of[rid] = row

    # ---- stats ---------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self._steps = self._sample_steps = self._accepted = self._tokens = 0
        self._time = 0.0

    def stats(self) -> EngineStats:
        ss = max(self._sample_steps, 1)
        return EngineStats(live=len(self.live), queued=len(self.queue), steps=self._steps, tokens=self._tokens,
                           tokens_per_s=self._tokens / self._time if self._time > 0 else 0.0,
                           mean_accepted=self._accepted / ss, mean_tokens_per_step=self._tokens / ss,
                           step_ms=1000.0 * self._time / max(self._steps, 1))

    def acceptance_records(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [M, 6], accepted [M]) of every tested node (verified with its parent accepted) over the last
        logged steps: what the acceptance predictor is fitted on. Features: path value, own draft probability,
        margin, depth, sibling rank, temperature."""
        if not self.node_log:
            return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
        vals, acc = zip(*self.node_log)
        return torch.cat(vals), torch.cat(acc)
