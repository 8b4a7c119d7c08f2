"""The profile run: time a target/draft pair's steps on this hardware and fit its calibration (step-time model +
roofline). The CLI is `drafting.calibrate.cli` (`python -m drafting.profile`), first use `drafting.calibrate.first_use`.

Steps are timed as the engine executes them: a real engine holds `live` synthetic samples and runs forced steps
(plain; drafting `depth` levels of `width` frontier nodes; verifying `nodes` per sample, for every sample or for
half of them, so padding is measured too), rewound after each step so the context stays put. Each sample is
prefilled once, with a short prompt; longer contexts are reached by rewinding (the K/V past the prompt are
zeros: a step's time does not depend on the values it attends to). The engine's own step log supplies the
timings; medians per configuration.

A budget (default: 2 minutes on CPU, 30 s on a GPU) bounds the profile: a short probe times each step shape
once on one sample and plain decoding on a full batch; the model pair's FLOPs per token fill in the cost of every
other grid point, and the richest grid whose estimate fits is run (fewer live-sample sizes, step shapes and
contexts as the budget shrinks; a costly point gets fewer repeats). The file lands where `calibration: auto`
looks for it, unless --out says otherwise."""
from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from drafting.policy.calibration import Calibration, key_name
from drafting.records import GenRequest, SamplingParams
from drafting.runtime.engine import Engine, position_bytes
from drafting.policy.strategy import DraftStrategy, StepView
from drafting.spec.tree import DraftTree, top_per_sample

LIVE = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
LAGS = (1, 3, 8)  # draft catch-up widths: after a speculative step 1 + accepted, after plain steps more
# (levels, frontier width, nodes verified per sample, only half the samples verify)
CONFIGS = ((1, 1, 1, False), (1, 2, 2, False), (2, 2, 4, False), (3, 2, 8, False), (2, 1, 2, True),
           (3, 4, 12, True), (4, 4, 16, False), (6, 2, 6, False))
QUICK_CONFIGS = ((1, 1, 1, False), (2, 2, 4, False), (3, 4, 12, True), (4, 4, 16, False))
MIN_CONFIGS = ((1, 1, 1, False), (2, 2, 4, False), (3, 4, 12, True))
PLAIN = None  # the plain step among the shapes a grid point times
PROBE_LIVE = 16  # the probe's batch for the cost of a token
PROMPT = 9  # tokens of each synthetic prompt: the drafter reads up to 8 tokens back
DEFAULT_BUDGET_S = {"cpu": 120.0, "cuda": 30.0}
FIT_RESERVE_S = 3.0  # what the fit (5-fold cross-validation of each component) takes, kept out of the grid
POINT_SHARE = 0.02  # a grid point's repeats stop at this share of the budget (one timed step at least)
NO_WARMUP_S = 0.5  # on CPU a step this long needs no warm-up step before it (allocation is a small part)
PROGRESS_EVERY_S = 5.0


class ForcedStrategy(DraftStrategy):
    """A fixed step shape for profiling: plain, or `depth` levels of `width` and `nodes` verified per sample
    (only by even rows when `half`, which pads the verify batch like an uneven selection does). With `host`
    the engine asks it level by level and packs the verify (the CPU path); without, the step is one fixed shape
    (the GPU path: graphs, no packing, so `half` costs what a full selection costs)."""

    def __init__(self, draft: bool, depth: int = 0, width: int = 1, nodes: int = 0, half: bool = False,
                 host: bool = True):
        super().__init__(f"forced:{int(draft)},{depth},{width},{nodes},{int(half)}", depth, 2, nodes, width)
        self.draft, self.half, self.host_decisions = draft, half and host, host

    def plan(self, view: StepView) -> bool:
        return self.draft

    def plan_shape(self, view: StepView):
        return super().plan_shape(view) if self.draft else None

    def select(self, tree: DraftTree, view: StepView) -> torch.Tensor:
        counts = torch.full((view.live,), self.nodes, dtype=torch.long, device=tree.value.device)
        if self.half:
            counts[1::2] = 0
        return top_per_sample(tree.value, counts)


# ---- the budget: a cost per grid point, and the richest grid that fits --------------------------------------
def flops_per_token(config, ctx: int) -> float:
    """Forward FLOPs of one token at context `ctx`: 2 x the weights it multiplies (LM head included) plus the
    attention over the context."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    h, layers, heads = d["hidden_size"], d["num_hidden_layers"], d["num_attention_heads"]
    kv, hd = d.get("num_key_value_heads") or heads, d.get("head_dim") or h // heads
    inter = d.get("intermediate_size") or 4 * h
    per_layer = h * (heads + 2 * kv) * hd + heads * hd * h + 3 * h * inter
    return 2.0 * (layers * per_layer + d["vocab_size"] * h) + 4.0 * layers * heads * hd * ctx


def step_tokens(shape, B: int, lag: int = LAGS[1]) -> tuple[float, float]:
    """(target tokens, draft tokens) one step of `shape` computes for B live samples (the CPU path packs the
    verify: half the samples verify nothing)."""
    if shape is PLAIN:
        return float(B), 0.0
    levels, width, nodes, half = shape
    verifying = math.ceil(B / 2) if half else B
    return float(B + verifying * nodes), float(B * lag + B * width * (levels - 1))


def measure_fit_s() -> float:
    """Seconds the final fit will take here: a few fits of each model family on a small synthetic profile, times
    the fits the cross-validation makes (scikit-learn's per-fit overhead dominates; its imports are paid first)."""
    from drafting.policy.calibration import COLUMNS, FAMILIES, _family

    rng = np.random.default_rng(0)
    X = np.column_stack([rng.integers(1, 64, 40), rng.integers(1, 600, 40), rng.integers(1, 17, 40),
                         rng.integers(9, 200, 40)]).astype(np.float64)
    y = 1.0 + 0.01 * X[:, 1] + rng.random(40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in FAMILIES:
            _family(name, "verify").fit(X, y).predict(X)
        t, n = time.perf_counter(), 3
        for _ in range(n):
            for name in FAMILIES:
                _family(name, "verify").fit(X, y).predict(X)
    per_fit = (time.perf_counter() - t) / (n * len(FAMILIES))
    return per_fit * len(COLUMNS) * (len(FAMILIES) * 5 + 1) * 1.2  # 5 folds per family, the final fit, slack


@dataclass
class CostModel:
    """Seconds of one forced step, from a few first timings: each shape's time on one sample (`base`, at
    `ctx0`), the time of a target token in a full batch (`token_s`, at `ctx0`), and the pair's FLOPs per token,
    which scale both to the draft and to other contexts."""

    base: dict  # shape -> seconds of one step with one live sample at ctx0
    token_s: float  # seconds per target token beyond the first sample's, at ctx0
    ctx0: int
    target_flops: Callable[[int], float]  # ctx -> FLOPs per token
    draft_flops: Callable[[int], float]

    def __call__(self, shape, B: int, ctx: int) -> float:
        t, d = step_tokens(shape, B)
        t1, d1 = step_tokens(shape, 1)
        f0 = self.target_flops(self.ctx0)
        extra = (t - t1) * self.target_flops(ctx) / f0 + (d - d1) * self.draft_flops(ctx) / f0
        return self.base[shape] + self.token_s * extra


@dataclass
class Grid:
    live: list  # live-sample counts, run largest first (samples leave as the count falls)
    ctx: list
    configs: tuple
    repeats: int
    warmup: int = 1  # steps run untimed before a point's repeats (on a GPU: the graph captures)
    point_cap_s: float = math.inf  # a point's timed steps stop at this many seconds (one at least)
    host: bool = True

    @property
    def shapes(self) -> list:
        return [PLAIN] + list(self.configs)

    def reps(self, shape, cost_s: float) -> int:
        """Timed steps of one point: plain is cheap, so it gets 3x the repeats (more points for the roofline);
        a costly point fewer, down to one."""
        want = self.repeats * (3 if shape is PLAIN else 1)
        return int(min(want, max(1, self.point_cap_s // max(cost_s, 1e-9))))

    def warm(self, cost_s: float) -> int:
        return self.warmup if not self.host or cost_s < NO_WARMUP_S else 0

    def points(self):
        """(live, ctx, shape) in run order."""
        for B in sorted(self.live, reverse=True):
            for ctx in self.ctx:
                for shape in self.shapes:
                    yield B, ctx, shape

    def seconds(self, cost) -> float:
        """Estimated seconds of the whole grid under `cost(shape, live, ctx)`."""
        total = 0.0
        for B, ctx, shape in self.points():
            c = cost(shape, B, ctx)
            total += (self.warm(c) + self.reps(shape, c)) * c
        return total

    def describe(self) -> str:
        return (f"{len(self.live)} live sizes x {len(self.ctx)} contexts x {len(self.shapes)} step shapes, "
                f"{self.repeats} repeats")


def thin(values: list, n: int) -> list:
    """n of the sorted values, evenly spread over their index (ends kept): LIVE is geometric, so is this."""
    if n >= len(values):
        return list(values)
    return sorted({values[int(round(i))] for i in np.linspace(0, len(values) - 1, n)})


def default_contexts(max_len: int, n: int = 3) -> list:
    lo, hi = max(min(16, max_len // 4), PROMPT), max_len - 24
    return sorted({lo, max_len // 2, hi}) if n >= 3 else sorted({lo, hi})


def ladder(max_slots: int, max_len: int, **grid_kw) -> list[Grid]:
    """Grids from the richest to the leanest: fewer repeats, then fewer live sizes, fewer step shapes, fewer
    contexts, fewer live sizes again, the fewest shapes, one repeat, and last a smaller largest batch."""
    full = sorted({b for b in LIVE if b <= max_slots} | {max_slots})
    mid, low = min(len(full), 6), min(len(full), 3)
    c3, c2 = default_contexts(max_len, 3), default_contexts(max_len, 2)
    out = [Grid(full, c3, CONFIGS, 3, **grid_kw)]
    out += [Grid(thin(full, n), c3, CONFIGS, 2, **grid_kw) for n in range(len(full), mid - 1, -1)]
    out += [Grid(thin(full, mid), c3, QUICK_CONFIGS, 2, **grid_kw), Grid(thin(full, mid), c2, QUICK_CONFIGS, 2,
                                                                        **grid_kw)]
    out += [Grid(thin(full, n), c2, QUICK_CONFIGS, 2, **grid_kw) for n in range(mid - 1, low - 1, -1)]
    out += [Grid(thin(full, low), c2, MIN_CONFIGS, 2, **grid_kw), Grid(thin(full, low), c2, MIN_CONFIGS, 1,
                                                                       **grid_kw)]
    # then the largest batches go: the step-time model's physics features extrapolate them (a busy machine, or
    # a large model on few cores)
    top = max_slots // 2
    while top >= 4:
        capped = [b for b in full if b < top] + [top]
        out.append(Grid(thin(capped, min(len(capped), 3)), c2, MIN_CONFIGS, 1, **grid_kw))
        top //= 2
    return out


def choose_grid(budget_s: float | None, cost, max_slots: int, max_len: int, **grid_kw) -> tuple[Grid, float, bool]:
    """The richest grid of `ladder` whose estimated seconds under `cost` fit the budget (None: the richest).
    Returns (grid, estimated seconds, fits); when none fits, the leanest with fits=False."""
    if budget_s is not None:
        grid_kw.setdefault("point_cap_s", POINT_SHARE * budget_s)
    grids = ladder(max_slots, max_len, **grid_kw)
    for grid in grids:
        est = grid.seconds(cost)
        if budget_s is None or est <= budget_s:
            return grid, est, True
    return grids[-1], est, False


def progress_line(done: float, elapsed_s: float, left_s: float | None, budget_s: float | None,
                  where: str = "") -> str:
    """One line of a profile's progress: share done, time so far, time left (None: not known yet), the budget."""
    budget = f"budget {budget_s:.0f} s" if budget_s else "no budget"
    at = f" ({where})" if where else ""
    left = "time left not known yet" if left_s is None else f"about {left_s:.0f} s left"
    return f"calibration: profiling {100 * done:3.0f}%{at}, {elapsed_s:.0f} s so far, {left} ({budget})"


def quality_line(cal: Calibration) -> str:
    """One line when a profile lands: its time, the grid and the fit's cross-validated error."""
    m = cal.meta
    budget = f" (budget {m['budget_s']:.0f} s)" if m.get("budget_s") else ""
    wall = m.get("wall_seconds", 0) + m.get("fit_seconds", 0)
    own = m.get("profile_seconds", 0) + m.get("fit_seconds", 0)
    beside = f" ({wall:.0f} s wall, with decoding between its slices)" if wall > own + 1 else ""
    return (f"calibration: profiled in {own:.0f} s{budget}{beside}, "
            f"{m.get('grid', '')}; step-time model cross-validated error {100 * cal.step_cv_error:.1f}%, "
            f"plain decoding saturates at {cal.saturation_live} live samples")


# ---- the profile itself: a sequence of slices ---------------------------------------------------------------
@contextmanager
def _quiet_engine(engine):
    """Profiling must not end a synthetic sample (EOS) nor leave its strategy behind."""
    saved = getattr(engine, "strategy", None), engine.stages.eos  # (none yet: profiled while it is being built)
    engine.stages.eos = None
    try:
        yield
    finally:
        if saved[0] is not None:
            engine.set_strategy(saved[0])
        engine.stages.eos = saved[1]


def stand_in(engine) -> Engine:
    """A twin of a draft-less engine that drafts with its own target, so that the profile's verify steps get their
    trees. Without a draft model only the plain and verify rows are read (rollout chains alone: no draft runs), so
    what the stand-in drafts with does not matter; the calibration is keyed by the target alone."""
    return Engine(engine.target, engine.target, strategy="none", max_slots=engine.max_slots, max_len=engine.max_len,
                  device=engine.device, dtype=engine.dtype, cuda_graphs=engine.graphs.enabled,
                  kv_cache="dense" if engine.pool is None else "paged")


class ProfileRun:
    """One profile of `engine` (idle; `ProfileRun.beside(engine)` makes a second engine sharing its weights),
    advanced in slices (`advance`) so a caller can interleave it with other work, or run to the end (`run`)."""

    def __init__(self, engine, budget_s: float | None = None, quick: bool = False, repeats: int | None = None,
                 live_grid=None, ctx_grid=None, report: Callable[[str], None] | None = None,
                 every_s: float = PROGRESS_EVERY_S):
        if engine.live or engine.queue:
            raise RuntimeError("profile_engine needs an idle engine (no live or queued requests)")
        self.key = engine.calibration_key()
        if engine.draft is None:  # a target alone (rollout drafts): see `stand_in`
            engine = stand_in(engine)
        S, L = engine.max_slots, engine.max_len
        if ctx_grid and (max(ctx_grid) > L - 24 or min(ctx_grid) < PROMPT):
            raise ValueError(f"profile contexts {ctx_grid} must lie in [{PROMPT}, max_len - 24 = {L - 24}]: a forced "
                             f"step commits up to 17 tokens and drafts from 8 tokens back")
        self.engine, self.report, self.every_s = engine, report, every_s
        self.host = engine.device.type != "cuda"
        warmup = 1 if self.host else 2 * len(LAGS)  # on a GPU: each lag's graph is captured at its second run
        self.budget_s = budget_s
        self.grid: Grid | None = None
        self.fixed = None
        if live_grid or ctx_grid or quick or budget_s is None:  # a grid given, or the full one: no probe
            live = live_grid or sorted({b for b in LIVE if b <= S} | {S})
            if quick:
                live = sorted({live[0], live[len(live) // 2], live[-1]} | set(live[::2]))
            self.fixed = Grid(live, ctx_grid or default_contexts(L), QUICK_CONFIGS if quick else CONFIGS,
                              repeats or (2 if quick else 3), warmup, host=self.host)
        self._warmup = warmup
        self.elapsed = 0.0  # seconds spent inside advance()
        self.cost: CostModel | None = None
        self.planned_s = 0.0
        self.done_pred = 0.0  # predicted seconds of the grid steps done so far
        self.grid_s = 0.0  # actual seconds of the grid steps done so far
        self.where = "probe"
        self.fit_reserve_s = FIT_RESERVE_S  # the probe measures it
        self.probe_s: dict = {}  # where the probe's seconds went
        self.calibration: Calibration | None = None
        self._last_report = 0.0
        self._work = self._run()

    @classmethod
    def beside(cls, engine, **kw) -> "ProfileRun":
        """A profile on a second engine that shares `engine`'s weights (its own KV slots), so `engine` keeps
        decoding between the slices."""
        twin = Engine(engine.target, engine.draft, strategy="none", max_slots=engine.max_slots,
                     max_len=engine.max_len, device=engine.device, dtype=engine.dtype,
                     cuda_graphs=engine.graphs.enabled, kv_cache="dense" if engine.pool is None else "paged",
                     kv_bytes=engine.max_slots * engine.tcache.columns * position_bytes(
                         engine.target, engine.draft, engine.head, engine.dtype))
        return cls(twin, **kw)

    @property
    def done(self) -> bool:
        return self.calibration is not None

    def advance(self, slice_s: float) -> bool:
        """Run profile steps for about slice_s seconds (one at least); True once the calibration is fitted."""
        start = time.perf_counter()
        while not self.done:
            t = time.perf_counter()
            next(self._work, None)
            self.elapsed += time.perf_counter() - t
            if self.report and not self.done and self.elapsed - self._last_report >= self.every_s:
                self._last_report = self.elapsed
                self.report(self.progress())
            if time.perf_counter() - start >= slice_s:
                break
        return self.done

    def run(self) -> Calibration:
        while not self.advance(1.0):
            pass
        return self.calibration

    def progress(self) -> str:
        if self.planned_s <= 0:  # the probe: the grid will fill what is left of the budget
            return progress_line(0.0, self.elapsed, max((self.budget_s or 0.0) - self.elapsed, 0.0), self.budget_s,
                                 self.where)
        if self.done_pred <= 0 and self.cost is None:
            return progress_line(0.0, self.elapsed, None, self.budget_s, self.where)
        rate = self.grid_s / self.done_pred if self.done_pred > 0 else 1.0  # how far the estimate was off
        done = min(self.done_pred / self.planned_s, 1.0)
        left = max(self.planned_s - self.done_pred, 0.0) * rate + self.fit_reserve_s
        return progress_line(done, self.elapsed, left, self.budget_s, self.where)

    # -- the work, one step per yield
    def _forced(self, shape, B: int, ctx: int, lag: int) -> dict:
        e = self.engine
        with torch.inference_mode():
            e.slots.rewind(np.full(B, ctx), np.full(B, max(ctx - lag, 1)))
            e.set_strategy(ForcedStrategy(False, host=self.host) if shape is PLAIN
                           else ForcedStrategy(True, *shape, host=self.host))
            e.step()
        return e.step_log[-1]

    def _resize(self, B: int) -> None:
        """Hold exactly B live synthetic samples: new ones prefill only their short prompt; the last rows leave."""
        e = self.engine
        with torch.inference_mode():
            n = len(e.live)
            for i in range(n - 1, B - 1, -1):
                e.remove(("profile", i))
            for i in range(n, B):
                prompt = torch.randint(0, e.target.shape.vocab_size, (PROMPT,), generator=self._gen).tolist()
                e.add(GenRequest(("profile", i), prompt, SamplingParams(temperature=1.0, max_new_tokens=e.max_len,
                                                                        seed=i)))
            e.admit()

    def _probe(self):
        """The CostModel's inputs, at the smallest context: each shape once on one sample, a plain step on a batch
        of PROBE_LIVE; and the fit's cost."""
        e, S = self.engine, self.engine.max_slots
        ctx0 = default_contexts(e.max_len)[0]
        at = self.elapsed
        self.fit_reserve_s = measure_fit_s()
        yield
        self.probe_s["fit_check"], at = self.elapsed - at, self.elapsed
        shapes = [PLAIN] + list(CONFIGS)
        base = {}
        self._resize(1)
        for shape in shapes:  # on CPU one warm-up step in all: a single sample's step allocates little
            for rep in range(1 + (self._warmup if shape is PLAIN or not self.host else 0)):
                log = self._forced(shape, 1, ctx0, LAGS[1])
                yield
            base[shape] = log["t_total"]  # wall time: what the budget counts
        self.probe_s["one_sample"], at = self.elapsed - at, self.elapsed
        P = min(S, PROBE_LIVE)  # a batch this large is past the per-token cost's knee; larger ones scale by it
        self._resize(P)
        yield
        self.probe_s["prefill"], at = self.elapsed - at, self.elapsed
        for rep in range(1 + self._warmup):
            log = self._forced(PLAIN, P, ctx0, 1)
            yield
        self.probe_s["batch"] = self.elapsed - at
        token_s = max((log["t_total"] - base[PLAIN]) / max(P - 1, 1), 1e-7)
        self.cost = CostModel(base, token_s, ctx0, partial(flops_per_token, e.target.config),
                              partial(flops_per_token, e.draft.config))

    def _run(self):
        e = self.engine
        self._gen = torch.Generator().manual_seed(0)
        t_start, cpu_start = time.perf_counter(), time.process_time()
        samples = {"plain": [], "root": [], "level": [], "verify": []}
        steps = []
        with _quiet_engine(e):
            if self.fixed is None:
                yield from self._probe()
                budget_left = self.budget_s - self.elapsed - self.fit_reserve_s
                self.grid, est, fits = choose_grid(budget_left, self.cost, e.max_slots, e.max_len,
                                                   warmup=self._warmup, host=self.host)
                self.full_grid_s = ladder(e.max_slots, e.max_len, warmup=self._warmup,
                                          host=self.host)[0].seconds(self.cost)  # what no budget would take
                if self.report:
                    note = "" if fits else f"; the leanest grid, over the budget by {est - budget_left:.0f} s"
                    self.report(f"calibration: profile grid {self.grid.describe()}, estimated "
                                f"{est + self.elapsed + self.fit_reserve_s:.0f} s{note}")
            else:
                self.grid = self.fixed
            grid = self.grid
            cost = self.cost or (lambda shape, B, ctx: 0.0)  # a fixed grid: every point its warm-up and repeats
            weight = self.cost or (lambda shape, B, ctx: 1.0)  # progress in predicted seconds, else in steps
            plan = [(B, ctx, shape, cost(shape, B, ctx), weight(shape, B, ctx)) for B, ctx, shape in grid.points()]
            self.planned_s = sum((grid.warm(c) + grid.reps(shape, c)) * w for _, _, shape, c, w in plan)
            i = 0
            while i < len(plan):
                B, ctx, shape, c, w = plan[i]
                i += 1
                if len(e.live) != B:
                    if self.cost is not None:
                        plan[i - 1:] = self._replan(plan[i - 1:], grid)
                        B, ctx, shape, c, w = plan[i - 1]
                    self._resize(B)
                    yield
                self.where = f"live {B}, ctx {ctx}"
                warm, reps = grid.warm(c), grid.reps(shape, c)
                offset = grid.shapes.index(shape)  # lags rotate across shapes too: one repeat still varies them
                times = {}
                for rep in range(warm + reps):
                    lag = 1 if shape is PLAIN else LAGS[(rep + offset) % len(LAGS)]
                    t = time.perf_counter()
                    log = self._forced(shape, B, ctx, lag)
                    self.grid_s += time.perf_counter() - t
                    self.done_pred += w
                    if rep >= warm:
                        self._record(times, log, shape, B, lag, ctx)
                    yield
                index = {}
                for (comp, *x), ts in times.items():
                    index.setdefault(comp, []).append(len(samples[comp]))
                    samples[comp].append([*x, 1000.0 * float(np.median(ts))])
                if shape is not PLAIN:  # one whole step of this shape, for the step-level CV error
                    steps.append((index["root"][0], index.get("level", []), index["verify"][0]))
            self._resize(0)
        self.where = "fitting"
        yield
        meta = {"max_slots": e.max_slots, "max_len": e.max_len, "roofline_ctx": e.max_len // 2, "steps": steps,
                "live_grid": grid.live, "ctx_grid": grid.ctx, "repeats": grid.repeats,
                "configs": [list(c) for c in grid.configs], "grid": grid.describe(), "budget_s": self.budget_s,
                "quick": grid.configs == QUICK_CONFIGS and self.fixed is not None, "torch": torch.__version__,
                # the profile's own seconds (what the budget counts); wall_seconds also holds the decoding that a
                # first-use profile interleaves with its slices
                "profile_seconds": round(self.elapsed, 1), "wall_seconds": round(time.perf_counter() - t_start, 1)}
        if self.cost is not None:
            meta["planned_s"] = round(self.planned_s, 1)
            meta["probe_s"] = {k: round(v, 1) for k, v in self.probe_s.items()}
            meta["full_grid_estimate_s"] = round(self.full_grid_s, 1)
        fit_start = time.perf_counter()
        if self.key != e.calibration_key():
            meta["draft"] = "stand-in: the target itself (root and level rows unused without a draft model)"
        cal = Calibration(self.key, samples, meta=meta).fit()
        cal.meta["fit_seconds"] = round(time.perf_counter() - fit_start, 1)
        cal.meta["cpu_seconds"] = round(time.process_time() - cpu_start, 1)  # < wall x threads: a busy machine
        self.calibration = cal

    def _replan(self, rest: list, grid: Grid) -> list:
        """Between live sizes: when the run so far says the rest will overrun the budget (a machine busier than
        the probe saw), drop remaining live sizes (the middle ones first; three stay, the fit needs them)."""
        rate = self.grid_s / self.done_pred if self.done_pred > 0 else 1.0

        def left(points):
            return sum((grid.warm(c) + grid.reps(shape, c)) * w for _, _, shape, c, w in points) * rate

        sizes = sorted({p[0] for p in rest}, reverse=True)
        kept_before = len(grid.live) - len(sizes)
        while (len(sizes) > 1 and kept_before + len(sizes) > 3
               and self.elapsed + left(rest) + self.fit_reserve_s > self.budget_s):
            drop = sizes.pop(len(sizes) // 2) if len(sizes) > 2 else sizes.pop(0)
            removed = [p for p in rest if p[0] == drop]
            rest = [p for p in rest if p[0] != drop]
            self.planned_s -= sum((grid.warm(c) + grid.reps(shape, c)) * w for _, _, shape, c, w in removed)
            grid.live = [b for b in grid.live if b != drop]
        return rest

    def _record(self, times: dict, log: dict, shape, B: int, lag: int, ctx: int) -> None:
        if shape is PLAIN:  # a whole plain step (on a GPU its device time)
            times.setdefault(("plain", B, ctx), []).append(log["t_total"] if self.host else log["t_plain"])
            return
        times.setdefault(("root", B, lag, ctx), []).append(log["t_root"])
        for (w, dt) in zip(log["level_widths"], log["t_levels"]):
            times.setdefault(("level", B, w, ctx), []).append(dt)
        times.setdefault(("verify", B, B + log["nodes"], log["width"], ctx), []).append(log["t_verify"])


def profile_engine(engine, quick: bool = False, repeats: int | None = None, live_grid=None, ctx_grid=None,
                   verbose: bool = True, budget_s: float | None = None) -> Calibration:
    """Time forced steps over a (live samples x context) grid on `engine` (which must be idle) and fit. With a
    budget (seconds) the grid is chosen to fit it; without, the full grid (or the one given)."""
    report = (lambda line: print(line, flush=True)) if verbose else None
    return ProfileRun(engine, budget_s, quick, repeats, live_grid, ctx_grid, report).run()


def summary(cal: Calibration) -> str:
    lines = [f"calibration {key_name(cal.key)}: profiled in {cal.meta.get('profile_seconds')} s "
             f"(+ fit {cal.meta.get('fit_seconds')} s), grid {cal.meta.get('grid', '')}"]
    for comp, fam in cal.families.items():
        errs = ", ".join(f"{f} {e:.3f}" for f, e in cal.cv_error[comp].items())
        lines.append(f"  {comp:<7} model: {fam:<7} (5-fold CV relative error: {errs})")
    lines.append(f"  speculative step, cross-validated relative error: {cal.step_cv_error:.3f}")
    r = cal.roofline
    lines.append(f"  roofline at ctx {r['ctx']}: plain decoding saturates at {r['saturation_live']} live samples "
                 f"({max(r['tokens_per_s']):.0f} tokens/s at best)")
    return "\n".join(lines)
