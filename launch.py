"""The one entry point: `python launch.py [--config FILE] [key.sub=value ...]`.

With no arguments it runs the embedded tiny default (configs/tiny.yaml), building the tiny world on
first use. Under `ray job submit` it joins that cluster (RAY_ADDRESS), otherwise it starts a local one.
"""
from __future__ import annotations

import argparse
import sys

from configs.schema import DEFAULT_CONFIG, ConfigError, load_config


def summarize(history: list[dict], window: int = 3) -> str:
    """First vs last iterations, averaged over a few so one noisy batch does not decide."""
    n = min(window, max(1, len(history) // 2))
    keys = [k for k in ("score/mean", "score/exact", "reward/mean") if k in history[0]]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    parts = [f"{k} {mean(history[:n], k):.3f} -> {mean(history[-n:], k):.3f}" for k in keys]
    return f"first vs last {n} iteration(s): " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. trainer.algorithm=ppo")
    args = parser.parse_args(argv)
    from trainer.data import DataError

    try:
        cfg = load_config(args.config, args.overrides)
        from trainer.run import run

        history = run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    if history:
        print(summarize(history))
    return 0


if __name__ == "__main__":
    sys.exit(main())
