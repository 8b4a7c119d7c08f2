"""What a profile budget costs in step-time model quality: the same model pair profiled under each budget (0 = the
full grid), timed, each fit's cross-validated error, and (when a full grid ran) each model's error on the full
grid's measured steps, a reference no budgeted fit saw.

    python -m bench.profile_budget --target DIR --draft DIR --budgets 120,0 [--max-slots 64 --max-len 160]
    python -m bench.profile_budget --quick     # the tiny pair, 16 slots, budgets 20 and 0
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from drafting.policy.calibration import Calibration
from drafting.calibrate.first_use import resolve_budget
from drafting.calibrate.profile import ProfileRun


def reference_error(cal: Calibration, ref: Calibration) -> float:
    """Mean relative error of `cal`'s predicted whole speculative steps (root + levels + verify) against the steps
    `ref` measured."""
    errs = []
    for root, levels, verify in ref.meta["steps"]:
        parts = [("root", root), ("verify", verify)] + [("level", i) for i in levels]
        true = sum(ref.samples[c][i][-1] for c, i in parts)
        pred = sum(float(cal.predict(c, [ref.samples[c][i][:-1]])[0]) for c, i in parts)
        errs.append(abs(pred - true) / true)
    plain = [abs(float(cal.predict("plain", [r[:-1]])[0]) - r[-1]) / r[-1] for r in ref.samples["plain"]]
    return float(np.mean(errs)), float(np.mean(plain))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target")
    ap.add_argument("--draft")
    ap.add_argument("--budgets", default="120,0", help="seconds, comma-separated; 0 = the full grid; auto = default")
    ap.add_argument("--max-slots", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=160)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quick", action="store_true", help="the tiny pair, 16 slots, budgets 20,0")
    ap.add_argument("--out", default="bench/results/profile_budget.json")
    args = ap.parse_args(argv)
    if args.quick or not args.target:
        from trainer.tiny.bootstrap import ensure_tiny_world

        world = ensure_tiny_world()
        args.target, args.draft = args.target or world.actor_path, args.draft or world.draft_path
        if args.quick:
            args.max_slots, args.budgets = 16, "20,0"
    torch.set_num_threads(args.threads)
    from drafting import SpeculativeEngine

    engine = SpeculativeEngine(args.target, args.draft, strategy="none", max_slots=args.max_slots,
                               max_len=args.max_len, device=args.device, dtype=getattr(torch, args.dtype))
    runs, cals = [], {}
    for spec in args.budgets.split(","):
        budget = resolve_budget(None if spec == "auto" else float(spec), engine.device)
        t = time.perf_counter()
        cal = ProfileRun(engine, budget, report=lambda line: print(line, flush=True)).run()
        wall = time.perf_counter() - t
        cals[spec] = cal
        runs.append({"budget_s": budget, "seconds": round(wall, 1), "over_budget": round(wall / budget, 3) if budget
                     else None, "grid": cal.meta["grid"], "live_grid": cal.meta["live_grid"],
                     "ctx_grid": cal.meta["ctx_grid"], "step_cv_error": round(cal.step_cv_error, 4),
                     "cv_error": {c: round(min(e.values()), 4) for c, e in cal.cv_error.items()},
                     "saturation_live": cal.saturation_live, "cpu_seconds": cal.meta.get("cpu_seconds"),
                     "probe_s": cal.meta.get("probe_s"), "planned_s": cal.meta.get("planned_s"),
                     "full_grid_estimate_s": cal.meta.get("full_grid_estimate_s")})
        print(f"budget {spec}: {wall:.0f} s, {cal.meta['grid']}, step CV error {cal.step_cv_error:.3f}", flush=True)
    full = next((cals[s] for s in cals if float(s if s != "auto" else 1) == 0), None)
    if full is not None:
        for run, cal in zip(runs, cals.values()):
            run["step_error_on_full_grid"], run["plain_error_on_full_grid"] = map(
                lambda x: round(x, 4), reference_error(cal, full))
    result = {"target": args.target, "draft": args.draft, "max_slots": args.max_slots, "max_len": args.max_len,
              "threads": args.threads, "device": str(engine.device), "runs": runs,
              "cpu_count": __import__("os").cpu_count(), "load_avg": list(__import__("os").getloadavg())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
