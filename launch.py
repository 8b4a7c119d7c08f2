"""The one entry point: `python launch.py [--config FILE] [key.sub=value ...]`.

With no arguments it runs the embedded tiny default (configs/tiny.yaml), building the tiny world on
first use. Under `ray job submit` it joins that cluster (RAY_ADDRESS), otherwise it starts a local one.
"""
from __future__ import annotations

import argparse
import sys

from configs.schema import DEFAULT_CONFIG, ConfigError, load_config


def summarize(history: list[dict], window: int = 3) -> str:
    """Held-out scores before vs after training, and training-batch scores of the first vs last iterations
    (averaged over a few, so one noisy batch does not decide)."""
    lines = []
    evals = [row for row in history if "eval/score" in row or "eval/reward" in row]
    if len(evals) >= 2:
        first, last = evals[0]["iteration"], evals[-1]["iteration"]
        for label, candidates in (("greedy", ("eval/score", "eval/exact", "eval/reward")),
                                  ("sampled (rollout temperature)", ("eval/sampled_score", "eval/sampled_exact"))):
            keys = [k for k in candidates if k in evals[0]]
            if keys:
                lines.append(f"held-out {label}, after {first} vs {last} iterations: "
                             + ", ".join(f"{k} {evals[0][k]:.3f} -> {evals[-1][k]:.3f}" for k in keys))
        for key in ("eval/exact", "eval/sampled_score"):
            if key in evals[0]:
                lines.append(f"{key} by iteration: " + "  ".join(f"{r['iteration']}: {r[key]:.3f}" for r in evals))
    train = [row for row in history if "reward/mean" in row]
    n = min(window, max(1, len(train) // 2))
    keys = [k for k in ("score/mean", "score/exact", "reward/mean") if k in train[0]]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    lines.append(f"training batches, first vs last {n} iteration(s): "
                 + ", ".join(f"{k} {mean(train[:n], k):.3f} -> {mean(train[-n:], k):.3f}" for k in keys))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. trainer.algorithm=ppo")
    args = parser.parse_args(argv)
    from trainer.loop import stop
    from trainer.loop.data import DataError
    from trainer.core.reward_fn import RewardFnError

    handlers = stop.install()
    stop.received = None
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        from trainer.loop.run import run

        history = run(cfg)
    except KeyboardInterrupt:  # stop.Interrupted, or the one ray.get raises for it
        stopped = stop.last()  # the actors are down (run's finally); Ray goes too, then one line
        print(stopped.line(_shut_down_ray(cfg)), file=sys.stderr, flush=True)
        return stopped.exit_status
    except _deaths() as e:  # an actor died with no restart left: one line, then status 3
        from trainer.loop.recovery import RestartsExhausted, ray_reason

        what = (f"{e.actor} died ({e.reason}) and trainer.max_restarts={e.limit} are spent"
                if isinstance(e, RestartsExhausted) else f"an actor died ({ray_reason(e)}) where no restart covers it")
        print(f"{what}; {_resume_hint(args, _shut_down_ray(cfg))}", file=sys.stderr, flush=True)
        return 3
    except (ConfigError, DataError, RewardFnError) as e:
        # raised in an actor, it arrives wrapped in Ray's RayTaskError (still of this type): show the cause alone
        kind = {ConfigError: "config", DataError: "data", RewardFnError: "reward"}
        print(f"{next(v for k, v in kind.items() if isinstance(e, k))} error: {getattr(e, 'cause', e)}",
              file=sys.stderr)
        return 2
    finally:
        stop.restore(handlers)  # launch.main called in-process (tests) leaves the signals as it found them
    if history:
        print(summarize(history))
    return 0


def _deaths() -> tuple:
    """The errors of a dead actor, once a run has imported Ray (a bad input stops before it is imported)."""
    if "ray" not in sys.modules:
        return ()
    from ray.exceptions import RayActorError

    from trainer.loop.recovery import RestartsExhausted

    return RestartsExhausted, RayActorError


def _resume_hint(args, checkpoint: str | None) -> str:
    """The command that goes on from the last checkpoint (or starts again when there is none)."""
    overrides = [o for o in args.overrides if not o.startswith("trainer.resume=")]
    command = " ".join(["python launch.py", "--config", args.config, *overrides])
    if checkpoint is None:
        return f"no checkpoint yet; start again: {command}"
    return f"last checkpoint {checkpoint}; resume: {command} trainer.resume=true"


def _shut_down_ray(cfg) -> str | None:
    """Disconnect from (or stop the local) Ray; returns the newest checkpoint of this run's output_dir, if any."""
    import ray

    from trainer.loop.checkpoint import CheckpointManager

    if ray.is_initialized():
        ray.shutdown()
    latest = CheckpointManager(cfg.trainer.output_dir, 0, None, None).latest() if cfg is not None else None
    return str(latest) if latest else None


if __name__ == "__main__":
    sys.exit(main())
