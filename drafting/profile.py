"""Profile a target/draft pair on this hardware and write its calibration (step-time model + roofline).

    python -m drafting.profile --config configs/tiny.yaml            # the config's actor and draft
    python -m drafting.profile --target PATH --draft PATH [--max-slots 64 --max-len 160 --threads 1]

Steps are timed as the engine executes them: a real engine holds `live` synthetic samples of `ctx` tokens
and runs forced steps (plain; drafting `depth` levels of `width` frontier nodes; verifying `nodes` per sample,
for every sample or for half of them, so padding is measured too), rewound after each step so the context
stays put. The engine's own step log supplies the timings. Warm-up, repeats, medians per configuration.
The file lands where `calibration: auto` looks for it, unless --out says otherwise."""
from __future__ import annotations

import argparse
import fcntl
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from drafting.calibration import Calibration, CalibrationError, key_name, load_calibration
from drafting.records import GenRequest, SamplingParams
from drafting.strategy import DraftStrategy, StepView
from drafting.tree import DraftTree, top_per_sample

LIVE = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
LAGS = (1, 3, 8)  # draft catch-up widths: after a speculative step 1 + accepted, after plain steps more
# (levels, frontier width, nodes verified per sample, only half the samples verify)
CONFIGS = ((1, 1, 1, False), (1, 2, 2, False), (2, 2, 4, False), (3, 2, 8, False), (2, 1, 2, True),
           (3, 4, 12, True), (4, 4, 16, False), (6, 2, 6, False))
QUICK_CONFIGS = ((1, 1, 1, False), (2, 2, 4, False), (3, 4, 12, True), (4, 4, 16, False))


def cache_dir() -> Path:
    env = os.environ.get("RLHFSPEC_CALIBRATION_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlhfspec" / "calibration"


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


@contextmanager
def _quiet_engine(engine):
    """Profiling must not end a synthetic sample (EOS) nor leave its strategy behind."""
    saved = engine.strategy, engine.eos
    engine.eos = None
    try:
        yield
    finally:
        engine.strategy, engine.eos = saved


def profile_engine(engine, quick: bool = False, repeats: int | None = None, live_grid=None, ctx_grid=None,
                   verbose: bool = True) -> Calibration:
    """Time forced steps over a (live samples x context) grid on `engine` (which must be empty) and fit."""
    if engine.live or engine.queue:
        raise RuntimeError("profile_engine needs an idle engine (no live or queued requests)")
    if engine.draft is None:
        raise ValueError("profiling needs a draft model (the calibration describes a target/draft pair)")
    t_start = time.perf_counter()
    repeats = repeats or (2 if quick else 3)
    S, L = engine.max_slots, engine.max_len
    live_grid = live_grid or sorted({b for b in LIVE if b <= S} | {S})
    if quick:
        live_grid = sorted({live_grid[0], live_grid[len(live_grid) // 2], live_grid[-1]} | set(live_grid[::2]))
    ctx_grid = ctx_grid or sorted({min(16, L // 4), L // 2, L - 24})
    if max(ctx_grid) > L - 24 or min(ctx_grid) < 9:
        raise ValueError(f"profile contexts {ctx_grid} must lie in [9, max_len - 24 = {L - 24}]: a forced step "
                         f"commits up to 17 tokens and drafts from 8 tokens back")
    configs = QUICK_CONFIGS if quick else CONFIGS
    V = engine.target.shape.vocab_size
    gen = torch.Generator().manual_seed(0)
    samples = {"plain": [], "root": [], "level": [], "verify": []}
    steps = []
    with _quiet_engine(engine), torch.inference_mode():
        for ctx in ctx_grid:
            for B in live_grid:
                for i in range(B):
                    prompt = torch.randint(0, V, (ctx,), generator=gen).tolist()
                    engine.add(GenRequest(("profile", i), prompt, SamplingParams(temperature=1.0, max_new_tokens=L,
                                                                                seed=i)))
                engine._admit()
                n0 = engine.h["n"][:B].copy()
                host = engine.device.type != "cuda"
                shapes = [ForcedStrategy(False, host=host)] + [ForcedStrategy(True, *c, host=host) for c in configs]
                warmup = 1 if host else 2 * len(LAGS)  # on a GPU: each lag's graph is captured at its second run
                for strategy in shapes:
                    times = {}
                    for rep in range(warmup + repeats * (1 if strategy.draft else 3)):  # plain: cheap, more points
                        lag = LAGS[rep % len(LAGS)] if strategy.draft else 1
                        engine.rewind(n0, np.maximum(n0 - lag, 1))
                        engine.set_strategy(strategy)
                        engine.step()
                        if rep >= warmup:
                            log = engine.step_log[-1]
                            if not strategy.draft:  # a whole plain step (on a GPU its device time)
                                times.setdefault(("plain", B, ctx), []).append(log["t_total"] if host
                                                                               else log["t_plain"])
                                continue
                            times.setdefault(("root", B, lag, ctx), []).append(log["t_root"])
                            for (w, dt) in zip(log["level_widths"], log["t_levels"]):
                                times.setdefault(("level", B, w, ctx), []).append(dt)
                            times.setdefault(("verify", B, B + log["nodes"], log["width"], ctx), []).append(
                                log["t_verify"])
                    index = {}
                    for (comp, *x), ts in times.items():
                        index.setdefault(comp, []).append(len(samples[comp]))
                        samples[comp].append([*x, 1000.0 * float(np.median(ts))])
                    if strategy.draft:  # one whole step of this shape, for the step-level CV error
                        steps.append((index["root"][0], index.get("level", []), index["verify"][0]))
                for i in range(B):
                    engine.remove(("profile", i))
                if verbose:
                    print(f"profiled live={B:<4} ctx={ctx:<4} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    meta = {"max_slots": S, "max_len": L, "roofline_ctx": L // 2, "steps": steps, "live_grid": live_grid,
            "ctx_grid": ctx_grid, "repeats": repeats, "quick": quick, "torch": torch.__version__,
            "profile_seconds": round(time.perf_counter() - t_start, 1)}
    cal = Calibration(engine.calibration_key(), samples, meta=meta).fit()
    cal.meta["fit_seconds"] = round(time.perf_counter() - t_start - meta["profile_seconds"], 1)
    return cal


def summary(cal: Calibration) -> str:
    lines = [f"calibration {key_name(cal.key)}: profiled in {cal.meta.get('profile_seconds')} s"]
    for comp, fam in cal.families.items():
        errs = ", ".join(f"{f} {e:.3f}" for f, e in cal.cv_error[comp].items())
        lines.append(f"  {comp:<7} model: {fam:<7} (5-fold CV relative error: {errs})")
    lines.append(f"  speculative step, cross-validated relative error: {cal.step_cv_error:.3f}")
    r = cal.roofline
    lines.append(f"  roofline at ctx {r['ctx']}: plain decoding saturates at {r['saturation_live']} live samples "
                 f"({max(r['tokens_per_s']):.0f} tokens/s at best)")
    return "\n".join(lines)


def resolve_calibration(engine, spec) -> Calibration:
    """spec: a Calibration, a file path, or 'auto' (this pair's cached file here; profiled on first use, with a
    lock so that instances starting together profile once)."""
    key = engine.calibration_key()
    if isinstance(spec, Calibration):
        if spec.key != key:
            raise CalibrationError(f"calibration {spec.path or '(in memory)'} was made for {spec.key}, "
                                   f"this engine is {key}")
        return spec
    if str(spec) != "auto":
        return load_calibration(spec, key)
    path = cache_dir() / f"{key_name(key)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return load_calibration(path, key)
        print(f"calibration: profiling this model pair on first use -> {path}", flush=True)
        cal = profile_engine(engine, verbose=False)
        cal.save(path)
        return cal


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="a run config: profile its model.actor and model.draft")
    ap.add_argument("--target", help="HF model directory of the target (actor)")
    ap.add_argument("--draft", help="HF model directory of the draft")
    ap.add_argument("--max-slots", type=int, default=None, help="live samples (default: the config's or 64)")
    ap.add_argument("--max-len", type=int, default=None, help="tokens per sample (default: the config's or 256)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's or 1)")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="a smaller grid (a rough profile, for tests)")
    ap.add_argument("--out", default=None, help="output file (default: where calibration 'auto' looks)")
    args = ap.parse_args(argv)
    slots, max_len, threads, dtype = 64, 256, 1, "float32"
    if args.config:
        from configs.schema import ConfigError, load_config
        from trainer.preflight import resolve_paths

        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        paths = resolve_paths(cfg)
        target, draft = paths.actor, paths.draft
        g = cfg.generation
        slots, max_len, threads, dtype = g.max_slots, g.max_len, g.threads_per_instance, cfg.model.dtype
    elif args.target and args.draft:
        target, draft = args.target, args.draft
    else:
        ap.error("give --config, or --target and --draft")
    slots, max_len = args.max_slots or slots, args.max_len or max_len
    threads, dtype = args.threads or threads, args.dtype or dtype
    torch.set_num_threads(threads)
    from drafting.engine import SpeculativeEngine

    engine = SpeculativeEngine(target, draft, strategy="none", max_slots=slots, max_len=max_len,
                               device=args.device, dtype=getattr(torch, dtype))
    cal = profile_engine(engine, quick=args.quick)
    out = Path(args.out) if args.out else cache_dir() / f"{key_name(cal.key)}.json"
    cal.save(out)
    print(summary(cal))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
