"""Profile a target/draft pair on this hardware and write its calibration (step-time model + roofline).

    python -m drafting.profile --config configs/tiny.yaml            # the config's actor and draft
    python -m drafting.profile --target PATH --draft PATH [--max-slots 64 --max-len 160 --threads 1]
    python -m drafting.profile ... --budget-s 60                     # a grid that fits 60 s (0: the full grid)

An entry point: it may read a run config (`configs`, `trainer.loop.preflight`), which the library may not."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from drafting.calibrate.first_use import _say, resolve_budget
from drafting.calibrate.profile import ProfileRun, quality_line, summary
from drafting.policy.calibration import cache_dir, key_name
from drafting.runtime.engine import Engine


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
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds the profile may take (default: the config's generation.profile_budget_s, else "
                         "120 on CPU, 30 on a GPU; 0 = the full grid)")
    ap.add_argument("--quick", action="store_true", help="a small fixed grid (a rough profile, for tests)")
    ap.add_argument("--out", default=None, help="output file (default: where calibration 'auto' looks)")
    args = ap.parse_args(argv)
    slots, max_len, threads, dtype, budget = 64, 256, 1, "float32", None
    if args.config:
        from configs.schema import ConfigError, load_config
        from trainer.loop.preflight import resolve_paths

        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        paths = resolve_paths(cfg)
        target, draft = paths.actor, paths.draft
        g = cfg.generation
        slots, max_len, threads, dtype = g.max_slots, g.max_len, g.threads_per_instance, cfg.model.dtype
        budget = getattr(g, "profile_budget_s", None)
    elif args.target and args.draft:
        target, draft = args.target, args.draft
    else:
        ap.error("give --config, or --target and --draft")
    slots, max_len = args.max_slots or slots, args.max_len or max_len
    threads, dtype = args.threads or threads, args.dtype or dtype
    budget = args.budget_s if args.budget_s is not None else budget
    try:
        budget = resolve_budget(budget, args.device)
    except ValueError as e:
        ap.error(str(e))
    torch.set_num_threads(threads)
    engine = Engine(target, draft, strategy="none", max_slots=slots, max_len=max_len,
                               device=args.device, dtype=getattr(torch, dtype))
    print(f"calibration: profiling (budget {budget or 0:.0f} s{'' if budget else ': the full grid'})", flush=True)
    cal = ProfileRun(engine, None if args.quick else budget, args.quick, report=_say).run()
    out = Path(args.out) if args.out else cache_dir() / f"{key_name(cal.key)}.json"
    cal.save(out)
    print(summary(cal))
    print(quality_line(cal))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
