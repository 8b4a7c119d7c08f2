"""GenerationInstance: a Ray actor that owns one speculative engine and steps it in the background."""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import threading
import time
from dataclasses import dataclass

import ray
import torch

from drafting import GenRequest, SpeculativeEngine
from drafting.calibrate.first_use import FirstUse, profile_needed
from actors.weight_sync import ACTOR_SRC, DRAFT_SRC, receive_broadcast
from migration.collective import CollectiveGroup, free_port
from migration.planner import InstanceLoad, SampleLoad
from migration.transfer import Emigration, Immigration, TransferRecord


class StepLock:
    """The engine's lock, shared fairly between the step loop and callers (stats, collect, submit, migration):
    a caller waiting for it gets it before the loop's next step. With a plain Lock the loop, re-acquiring at
    once, could starve a caller for a whole rollout (a balancer poll answered only after the samples ended)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting = 0
        self._turn = threading.Condition()  # guards _waiting; notified when it falls to 0

    def __enter__(self):  # a caller
        with self._turn:
            self._waiting += 1
        self._lock.acquire()
        with self._turn:
            self._waiting -= 1
            if not self._waiting:
                self._turn.notify_all()
        return self

    def __exit__(self, *exc):
        self._lock.release()

    @contextlib.contextmanager
    def step(self):
        """The step loop's turn: after the callers already waiting."""
        with self._turn:
            self._turn.wait_for(lambda: not self._waiting, timeout=1.0)
        with self._lock:
            yield


@dataclass
class InstanceStats:
    index: int
    live: int  # samples decoding now
    queued: int  # admitted, waiting for a slot
    finished_waiting: int  # done, not yet collected
    tokens_per_s: float
    mean_accepted: float
    steps: int
    weight_version: int = 0  # the weight push the instance decodes with (actor)
    draft_version: int = 0  # ... and the draft's (0 = the draft it started with)
    kv_tokens: int = 0  # committed KV positions of the live samples
    recent_tokens_per_s: float = 0.0  # committed tokens per second over the last few seconds
    saturation_live: int | None = None  # live samples where throughput stops growing (engine calibration)
    step_ms: float = 0.0  # mean wall time of one engine step so far


# the rollout drafts' summary (`Engine.rollout_summary`): sizes of the index now, whose peak over a rollout is its
# figure; every other number is a count since the engine started, or a ratio of counts
ROLLOUT_GAUGES = ("index_docs", "index_index_tokens", "index_index_entries", "index_groups", "index_live")


def _sample_steps(summary: dict) -> float:
    """The summary's sample-steps since the engine started: its own count, or chains / chains_per_step."""
    if "sample_steps" in summary:
        return summary["sample_steps"]
    chains = sum(v for k, v in summary.items() if k.startswith("chains_") and k != "chains_per_step")
    per_step = summary.get("chains_per_step", 0)
    return chains / per_step if per_step else 0.0


def rollout_window(now: dict, last: dict, peaks: dict | None = None) -> dict:
    """The rollout drafts' work between two summaries of one engine, as numbers that add up over instances: counts
    as differences; a per-sample-step ratio `X_per_step[_Y]` as its count `X[_Y]` (the ratio times the sample-steps,
    `sample_steps` the window's); other ratios (`*_rate`, `lookup_ms_per_step`) left out, made again from the counts;
    the index's sizes as their peaks (`peaks`: the largest seen since `last`, sampled during the rollout)."""
    out: dict = {}
    ss_now, ss_last = _sample_steps(now), _sample_steps(last)
    for key, value in now.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key in ROLLOUT_GAUGES:
            out[key] = max(value, (peaks or {}).get(key, value))
        elif key.endswith("_rate") or key.startswith("lookup_ms"):
            continue
        elif "_per_step" in key:
            out[key.replace("_per_step", "")] = round(value * ss_now - last.get(key, 0) * ss_last, 6)  # float noise
        elif key != "sample_steps":
            out[key] = value - last.get(key, 0)
    out["sample_steps"] = ss_now - ss_last
    return out


class GenerationInstance:
    """Thin actor: requests in, finished rollouts out; all decoding logic lives in `drafting/`."""

    def __init__(self, index: int, actor_path: str, draft_path: str, strategy: str, max_slots: int,
                 max_len: int, device: str = "cpu", threads: int = 1, dtype: str = "float32",
                 calibration: str | None = "auto", attention: str = "auto", cuda_graphs: bool = True,
                 compile: bool = True, profile_budget_s: float | None = None, profile_fallback: str = "none",
                 kv: dict | None = None, rollout_drafts=None):
        """profile_budget_s, profile_fallback: with strategy adaptive, calibration 'auto' and no profile of the
        pair here yet, the engine decodes with the fallback strategy while the pair is profiled (within the
        budget) between its steps, then switches (`drafting.calibrate.first_use.FirstUse`). kv: the engine's K/V
        cache settings (kv_cache, kv_block, kv_bytes, swap_bytes). rollout_drafts: a `drafting.spec.suffix.
        SuffixConfig` (chains from the rollout itself: the sample's text, its request group, the history each
        request brings) or None (off). The history itself is the driver's: it comes with the requests, so a
        replaced instance loses nothing."""
        torch.set_num_threads(threads)
        self.index = index
        self.device = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
        self._engine_args = dict(actor_path=actor_path, draft_path=draft_path, max_len=max_len, dtype=dtype,
                                 calibration=calibration, attention=attention, cuda_graphs=cuda_graphs,
                                 compile=compile, profile_budget_s=profile_budget_s, profile_fallback=profile_fallback,
                                 kv=kv or {})
        self._rollout_drafts = rollout_drafts
        self._rollout_last: dict = {}  # the engine's rollout-draft counts at the last rollout_summary
        self._rollout_peaks: dict = {}  # the index's largest sizes since then (sampled between steps)
        self._rollout_sample_at = 0.0  # when they are sampled next
        self._start_engine(strategy, max_slots)
        self._lock = StepLock()
        self._step_floor_s = 0.0  # slow_steps (tests)
        self._work = threading.Event()
        self._finished = []
        self._error: BaseException | None = None
        self._weight_group: CollectiveGroup | None = None
        # sample reallocation: calls run at step boundaries, the KV group, orders in flight, outputs held back
        self._calls: list = []
        self._calls_lock = threading.Lock()
        self._kv_group: CollectiveGroup | None = None
        self._orders: dict = {}
        self._lent: dict = {}  # queued order id -> requests taken off the queue, until the order's verdict
        self._closed: set = set()  # queued orders of a dead balancer the fleet settled: deliveries refused
        self._opened: dict = {}  # (side, order id) -> when it opened here: the fleet's check for a stuck balancer
        self._transferring: set = set()  # (side, order id) whose migrate_in / migrate_out call is running
        self._unconfirmed: set = set()  # imported, the move not yet confirmed: outputs wait in _withheld
        self._withheld: list = []
        self._recent: collections.deque = collections.deque()  # (time, tokens committed by one step)
        self._tokens_seen = 0
        self._kv_last: dict = {}  # the engine's K/V counts at the last kv_summary
        self._crash_point: str | None = None
        self._slice_s = 0.05  # a profile slice while a rollout runs: as long as the last engine step
        self._loop = threading.Thread(target=self._step_loop, daemon=True, name=f"gen-{index}")
        if self._first_use is not None:
            self._work.set()  # the profile runs while the instance is idle too
        self._loop.start()

    def _start_engine(self, strategy: str, max_slots: int) -> None:
        """A new engine from the model files (the weights of no push), and what a new instance starts with."""
        a = self._engine_args
        # drafts come from a draft model, or from the rollout alone (model.draft null, rollout drafts on)
        drafts = bool(a["draft_path"]) or self._rollout_drafts is not None
        first_use = drafts and profile_needed(strategy, a["calibration"])
        self.engine = SpeculativeEngine(a["actor_path"], a["draft_path"],
                                        strategy=a["profile_fallback"] if first_use else strategy,
                                        max_slots=max_slots, max_len=a["max_len"], device=self.device,
                                        dtype=getattr(torch, a["dtype"]),
                                        calibration=a["calibration"] if drafts else None,
                                        attention=a["attention"], cuda_graphs=a["cuda_graphs"], compile=a["compile"],
                                        **a["kv"], **self._rollout_kwargs())
        self._first_use = FirstUse.start(self.engine, strategy, a["profile_fallback"], a["profile_budget_s"],
                                         report=self._say) if first_use else None
        self.weight_version = self.draft_version = 0
        self.saturation_live: int | None = None  # resolve_saturation() reads it when a balancer needs it

    def _rollout_kwargs(self) -> dict:
        """The engine's rollout_drafts argument; left out when off (the same as None)."""
        return {} if self._rollout_drafts is None else {"rollout_drafts": self._rollout_drafts}

    def restart(self, strategy: str, max_slots: int, rollout_drafts=None) -> int:
        """Start over as a new instance would, in this process (benchmarks run many short runs on one set of
        actors): a new engine from the model files with this strategy, slot count and rollout drafts (a
        SuffixConfig or None); the groups stay. Only between runs: it refuses while a sample is in flight, so none
        is dropped."""
        self._check()
        with self._lock:
            busy = len(self.engine.live) + len(self.engine.queue) + len(self._finished) + len(self._withheld)
            if busy or self._orders or self._first_use is not None:
                raise RuntimeError(f"generation instance {self.index}: restart with {busy} samples in flight, "
                                   f"{len(self._orders)} migration orders open or a first-use profile running")
            self._rollout_drafts, self._rollout_last, self._rollout_peaks = rollout_drafts, {}, {}
            self._start_engine(strategy, max_slots)
            self._recent.clear()
            self._tokens_seen = 0
            if self._first_use is not None:
                self._work.set()
        return self.index

    def _say(self, line: str) -> None:
        """A line for the driver's console (Ray forwards an actor's stdout there)."""
        print(f"generation instance {self.index}: {line}", flush=True)

    def _profile_slice(self) -> None:
        """First use: a slice of the profile, outside the step lock (it runs on its own engine, sharing only the
        weights; a weight push during a slice changes no timing). Idle, longer slices; in a rollout, as long as
        one engine step, so the rollout runs at about half speed until the calibration lands."""
        busy = bool(self.engine.live or self.engine.queue)
        if not busy and self._first_use.run is None:
            time.sleep(0.25)  # waiting for another process's profile: nothing to do here meanwhile
        try:
            ready = self._first_use.advance(self._slice_s if busy else 0.5)
        except Exception as e:  # noqa: BLE001 - a failed profile costs the adaptive strategy, not the run
            self._say(f"calibration: the profile failed ({type(e).__name__}: {e}); decoding with "
                      f"'{self._first_use.fallback}' from here on")
            self._first_use.close()
            self._first_use = None
            self.engine.calibration_spec = None  # nothing profiles again behind a rollout's back
            return
        if ready:
            with self._lock:
                self._first_use.finish()  # between two engine steps: the strategy switches
                self._first_use = None

    def profile_status(self) -> dict:
        """The first-use profile: state (none | profiling | waiting | ready), its progress line, the strategy now."""
        fu = self._first_use
        if fu is None:
            return {"state": "none", "progress": "", "strategy": self.engine.strategy.name}
        return fu.status()

    def _step_loop(self) -> None:
        while True:
            self._work.wait()
            try:
                if self._first_use is not None:
                    self._profile_slice()
                with self._lock.step():
                    self._run_boundary_calls()
                    t, busy = time.perf_counter(), bool(self.engine.live or self.engine.queue)
                    done = self.engine.step()
                    if busy:
                        self._slice_s = min(max(time.perf_counter() - t, 0.02), 1.0)
                    for out in done:  # weights change only between rollouts: these made the whole sample
                        out.stats.update(weight_version=self.weight_version, draft_version=self.draft_version,
                                         instance=self.index)  # where it finished (migrations move samples)
                        (self._withheld if out.request_id in self._unconfirmed else self._finished).append(out)
                    if busy and time.monotonic() > self._rollout_sample_at:
                        self._note_rollout_peaks()
                    stats = self.engine.stats()
                    self._note_tokens(stats.tokens)
                    with self._calls_lock:
                        if stats.live == 0 and stats.queued == 0 and not self._calls and self._first_use is None:
                            self._work.clear()
                if busy and self._step_floor_s:  # outside the lock: callers go on meanwhile
                    time.sleep(max(0.0, t + self._step_floor_s - time.perf_counter()))
            except BaseException as e:  # noqa: BLE001 - surfaced to the driver on its next call
                self._error = e
                self._work.clear()
                return

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"generation instance {self.index} step loop failed") from self._error

    def submit(self, requests: list[GenRequest], order_id: int | None = None) -> int:
        """Queue requests atomically (one batch per call keeps the schedule reproducible). `order_id`: a balancer's
        queued order delivering them; -1 (nothing queued) once the fleet has settled that order (`close_lent`)."""
        self._check()
        with self._lock:
            if order_id is not None and order_id in self._closed:
                return -1
            for request in requests:
                self.engine.add(request)
        self._work.set()
        return len(requests)

    def collect(self, wait_s: float = 0.0) -> list:
        """Finished rollouts since the last call; waits up to wait_s for the first one."""
        deadline = time.monotonic() + wait_s
        while True:
            self._check()
            with self._lock:
                if self._finished or time.monotonic() >= deadline:
                    out, self._finished = self._finished, []
                    return out
            time.sleep(0.005)

    def stats(self) -> InstanceStats:
        self._check()
        with self._lock:
            s = self.engine.stats()
            return InstanceStats(self.index, s.live, s.queued, len(self._finished), s.tokens_per_s,
                                 s.mean_accepted, s.steps, self.weight_version, self.draft_version,
                                 kv_tokens=sum(kv for _, kv, _, _ in self.engine.sample_loads()),
                                 recent_tokens_per_s=self._recent_rate(2.0), saturation_live=self.saturation_live,
                                 step_ms=s.step_ms)

    def kv_summary(self) -> dict:
        """The K/V memory's work since the last call: preemptions, resumes, prompt tokens prefilled and shared, and
        the pool's peak occupancy (paged)."""
        with self._lock:
            s = self.engine.stats()
        now = {k: getattr(s, k) for k in ("preemptions", "resumed", "prefill_tokens", "shared_tokens")}
        last, self._kv_last = self._kv_last, now
        out = {k: v - last.get(k, 0) for k, v in now.items()}
        out["kv_peak_frac"] = s.kv_blocks_peak / s.kv_blocks if s.kv_blocks else 0.0
        return out

    def rollout_summary(self) -> dict:
        """The rollout drafts' figures since the last call (`rollout_window`): chains and the tokens they had
        accepted, by source, history hits, lookups and their time, the index's size; {} when they are off."""
        if self._rollout_drafts is None or not hasattr(self.engine, "rollout_summary"):
            return {}
        with self._lock:
            now = dict(self.engine.rollout_summary() or {})
        out = rollout_window(now, self._rollout_last, self._rollout_peaks)
        self._rollout_last, self._rollout_peaks = now, {}
        return out

    def _note_rollout_peaks(self) -> None:
        """The index's sizes now (under the step lock): their peaks are the rollout's figures (a group's index goes
        when its last sample leaves, so after a rollout it is empty)."""
        if self._rollout_drafts is None or not hasattr(self.engine, "rollout_summary"):
            return
        start = time.monotonic()
        now = self.engine.rollout_summary() or {}
        # a summary walks the index, and the next step waits meanwhile: at most 2% of the time, 10 times a second
        self._rollout_sample_at = time.monotonic() + max(0.1, 50 * (time.monotonic() - start))
        for key in ROLLOUT_GAUGES:
            if key in now:
                self._rollout_peaks[key] = max(self._rollout_peaks.get(key, 0), now[key])

    def drafting_summary(self) -> dict:
        """What the draft strategy did since the last call (plain steps, nodes, levels, predicted vs realised
        acceptance, selection overhead), and the acceptance predictor's calibration; the log is emptied."""
        from drafting.runtime.steplog import summarize

        with self._lock:
            steps = list(self.engine.step_log)
            self.engine.step_log.clear()
            out = summarize(steps)
            predictor = getattr(self.engine.strategy, "predictor", None)
            if predictor is not None:
                out["predictor_ece"] = predictor.calibration()["ece"]
            return out

    # --- weight sync: trainer rank 0 broadcasts, every instance receives -------------------------
    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str,
                          timeout_s: float = 300.0) -> bool:
        """timeout_s: the op timeout; a sender that dies mid-push releases this instance within it."""
        self._weight_group = CollectiveGroup(host, port, rank, world_size, "weights", backend, timeout_s)
        return True

    def receive_weights(self, specs: list[tuple[str, tuple, str]], version: int = 0,
                        draft_specs: list[tuple[str, tuple, str]] | None = None, draft_version: int = 0) -> dict:
        """One weight push: the actor's parameters from the policy's rank 0, then (draft_specs given) the draft's
        from the draft trainer, loaded into the engine. Returns the seconds each part took here."""
        start = time.perf_counter()
        target = receive_broadcast(self._weight_group, specs, ACTOR_SRC)
        received = time.perf_counter()
        draft = receive_broadcast(self._weight_group, draft_specs, DRAFT_SRC) if draft_specs else None
        draft_received = time.perf_counter()
        with self._lock:  # only between iterations: no sample is live
            self.engine.load_target_weights(target)
            self.weight_version = version
            loaded = time.perf_counter()
            if draft is not None:
                self.engine.load_draft_weights(draft)
                self.engine.on_draft_update()  # acceptance records of the old draft go; the predictor refits
                self.draft_version = draft_version
        return {"target_s": (received - start) + (loaded - draft_received),
                "draft_s": (draft_received - received) + (time.perf_counter() - loaded)}

    def ping(self) -> int:
        return self.index

    def _models(self) -> list:
        return [m for m in (self.engine.target, self.engine.draft) if m is not None]

    def send_weights_to(self, dst: int) -> int:
        """A replacement joins a rollout: this instance's weights (actor, then draft; every HF-named tensor in
        order) to KV-group rank `dst`, point to point. They change only between rollouts, so the step loop goes
        on meanwhile. Returns the tensors sent."""
        group, count = self._kv_group, 0
        for model in self._models():
            for tensor in model.views.values():
                group.send(tensor.detach().to(group.device), dst)
                count += 1
        return count

    def receive_weights_from(self, src: int, version: int, draft_version: int) -> int:
        """The other end of `send_weights_to` (a new instance, holding no sample yet); returns tensors loaded."""
        group, count = self._kv_group, 0
        for model in self._models():
            named = {name: group.recv(torch.empty(view.shape, dtype=view.dtype, device=group.device), src)
                     for name, view in model.views.items()}
            with self._lock:
                count += model.load_weights(named)
        self.weight_version, self.draft_version = version, draft_version
        return count

    def slow_steps(self, seconds: float) -> None:
        """Fault injection for tests: each engine step takes at least this long (0: as fast as it goes)."""
        self._step_floor_s = seconds

    # --- sample reallocation: the instances' KV group and both ends of a migration order ---------
    def _run_boundary_calls(self) -> None:
        with self._calls_lock:
            calls, self._calls = self._calls, []
        for fn, future in calls:
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - the caller gets it
                future.set_exception(e)

    def _at_boundary(self, fn):
        """Run fn under the step lock between two steps (rows move when slots free, so an export or import must
        not interleave with a step); the step loop runs it first thing before its next step."""
        future = concurrent.futures.Future()
        with self._calls_lock:
            self._calls.append((fn, future))
            self._work.set()
        while True:  # a call that ran is reported as run, even if the step loop failed right after it
            try:
                return future.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                self._check()

    def resolve_saturation(self) -> int | None:
        """The engine's profiled saturation point (balancer threshold `auto`), read between rollouts: reading it
        may profile the model pair on first use, which needs an idle engine and must not stall a rollout.
        None (the balancer then falls back to a stated default) when there is none."""
        def read() -> int | None:
            if self._first_use is not None:  # not profiled yet: never profile here, in the way of a rollout
                print(f"generation instance {self.index}: no saturation point until the profile lands", flush=True)
                return None
            try:
                return getattr(self.engine, "saturation_live", None)
            except Exception as e:  # noqa: BLE001 - a missing or unusable calibration only costs the default
                print(f"generation instance {self.index}: no saturation point ({e})", flush=True)
                return None

        self.saturation_live = self._at_boundary(read)
        return self.saturation_live

    def _note_tokens(self, total: int) -> None:
        now = time.monotonic()
        self._recent.append((now, total - self._tokens_seen if total >= self._tokens_seen else total))
        self._tokens_seen = total
        while now - self._recent[0][0] > 30.0:
            self._recent.popleft()

    def _recent_rate(self, window_s: float) -> float:
        now = time.monotonic()
        return sum(n for t, n in self._recent if now - t <= window_s) / window_s

    def load(self, window_s: float = 2.0) -> InstanceLoad:
        """What the load balancer plans from: counts, KV held, recent throughput, each running sample."""
        def read() -> InstanceLoad:
            e = self.engine
            samples = [SampleLoad(*row) for row in e.sample_loads()]
            st = e.stats()
            return InstanceLoad(self.index, len(e.live), len(e.queue), e.max_slots, e.reserved,
                                sum(s.kv_tokens for s in samples), self._recent_rate(window_s),
                                self.saturation_live, samples, [q.request_id for q in e.queue],
                                kv_capacity=st.kv_blocks * st.kv_block,
                                kv_free=(st.kv_blocks - st.kv_blocks_used) * st.kv_block)

        return self._at_boundary(read)  # a waiter on the step lock itself can starve behind the loop

    def kv_group_address(self) -> tuple[str, int]:
        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def join_kv_group(self, host: str, port: int, rank: int, world_size: int, backend: str, name: str,
                      timeout_s: float) -> bool:
        self._kv_group = None  # a rebuilt group replaces the old one (a member died or a transfer failed)
        self._kv_group = CollectiveGroup(host, port, rank, world_size, name, backend, timeout_s)
        return True

    def take_queued(self, request_ids: list, order_id: int | None = None) -> list[GenRequest]:
        """Remove these requests from the queue (those not admitted yet) and hand them over. With an order id they
        stay on loan here until `finish_lent`: a balancer that dies with them in hand loses nothing."""
        def take() -> list[GenRequest]:
            wanted = set(request_ids)
            taken = [q for q in self.engine.queue if q.request_id in wanted]
            for q in taken:
                self.engine.remove(q.request_id)
            if order_id is not None and taken:
                self._lent[order_id] = taken
                self._opened["lent", order_id] = time.monotonic()
            return taken

        return self._at_boundary(take)

    def finish_lent(self, order_id: int, returned: list) -> int:
        """A queued order's verdict: the lent requests in `returned` (their destination never queued them) go
        back on this queue; the others have moved. Returns how many came back."""
        self._opened.pop(("lent", order_id), None)
        back = [q for q in self._lent.pop(order_id, []) if q.request_id in set(returned)]
        if back:
            self.submit(back)
        return len(back)

    def close_lent(self, order_id: int, request_ids: list) -> list:
        """The fleet settles a dead balancer's queued order: from now on its delivery is refused here (`submit`), and
        of its `request_ids` those this instance holds (queued, decoding, or finished and not yet collected) are
        returned: they moved."""
        with self._lock:
            self._closed.add(order_id)
            here = {q.request_id for q in self.engine.queue} | {row[0] for row in self.engine.sample_loads()}
            here |= {o.request_id for o in self._finished + self._withheld}
            return [r for r in request_ids if r in here]

    def clear_closed(self) -> None:
        """A new balancer numbers its orders from 1 again."""
        with self._lock:
            self._closed.clear()

    def reserve(self, order_id: int, slots: int, peer: int, two_stage: bool) -> bool:
        """Destination: hold slots for an order from KV-group rank `peer`; False = refused, nothing was sent. (The
        K/V blocks are reserved by the transfer itself, from the source's plan, before any K/V moves: a pool that
        cannot spare them refuses there, `TransferRecord.refused`.)"""
        self._check()
        order = Immigration(order_id, slots, peer, two_stage, self._kv_group, self.engine, self._at_boundary,
                            self._unconfirmed.add, self._fault)
        if not order.reserve():
            return False
        self._orders["in", order_id] = order
        self._opened["in", order_id] = time.monotonic()
        return True

    def migrate_in(self, order_id: int) -> TransferRecord:
        """Destination: receive both stages and import; returns which samples landed."""
        self._transferring.add(("in", order_id))
        try:
            return self._orders["in", order_id].run()
        finally:
            self._transferring.discard(("in", order_id))

    def finish_in(self, order_id: int) -> TransferRecord:
        """Destination: the move is recorded; outputs of the imported samples may leave. Slots and blocks still
        reserved (an order whose transfer never ran or ended: its balancer died) are given back."""
        order = self._orders.pop(("in", order_id))
        self._opened.pop(("in", order_id), None)
        if order.held or order.kv is not None:
            order.abort(RuntimeError("its balancer died before the transfer"))
        if order.record.request_ids:
            order.confirm()
        ids = set(order.record.request_ids)

        def release() -> None:
            self._unconfirmed -= ids
            self._finished += [o for o in self._withheld if o.request_id in ids]
            self._withheld = [o for o in self._withheld if o.request_id not in ids]

        self._at_boundary(release)
        return order.record

    def migrate_out(self, order_id: int, request_ids: list, peer: int, two_stage: bool) -> TransferRecord:
        """Source: stage 1 (unless stop-and-copy) and stage 2 to KV-group rank `peer`."""
        self._check()
        order = Emigration(order_id, request_ids, peer, two_stage, self._kv_group, self.engine, self._at_boundary,
                           self._fault)
        self._orders["out", order_id] = order
        self._opened["out", order_id] = time.monotonic()
        self._transferring.add(("out", order_id))
        try:
            return order.run()
        finally:
            self._transferring.discard(("out", order_id))

    def open_orders(self) -> list[dict]:
        """The migration orders this instance holds open (each waits for its balancer's verdict): side (in:
        destination, out: source), order id, state, the samples it imported or froze, and whether its transfer
        is still running, and how long it has been open. The fleet settles them itself when their balancer died
        (or is stuck). Side lent: a queued order's requests, taken off this queue."""
        now = time.monotonic()
        age = lambda key: now - self._opened.get(key, now)  # noqa: E731
        return [{"side": side, "order_id": oid, "state": o.state.value, "request_ids": list(o.record.request_ids),
                 "transferring": (side, oid) in self._transferring, "age_s": age((side, oid))}
                for (side, oid), o in list(self._orders.items())] + \
               [{"side": "lent", "order_id": oid, "state": "lent", "request_ids": [q.request_id for q in taken],
                 "transferring": False, "age_s": age(("lent", oid))} for oid, taken in list(self._lent.items())]

    def finish_out(self, order_id: int, moved: list) -> TransferRecord:
        """Source: the verdict. Samples in `moved` live on at the destination; the rest resume here."""
        self._opened.pop(("out", order_id), None)
        return self._orders.pop(("out", order_id)).finish(moved)

    def crash_at(self, point: str | None) -> None:
        """Fault injection for tests: the process exits when a migration reaches `point`
        ("source:after_stage1" or "destination:after_stage1")."""
        self._crash_point = point

    def _fault(self, point: str) -> None:
        if point == self._crash_point:
            os._exit(1)


GenerationInstanceActor = ray.remote(GenerationInstance)
