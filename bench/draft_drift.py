"""Draft drift: does online draft adaptation keep acceptance up while the actor moves away from the draft?

    python -m bench.draft_drift --out bench/results/draft_drift.json [--quick] [--repeats 2] [key=value ...]

RLHF (GRPO) on the tiny world with an actor learning rate that makes the actor drift clearly, the same seeds
with `draft.online` off and on, runs interleaved (off, on, on, off, ...). Per iteration and mode: accepted
draft tokens per sample-step (`rollout/mean_accepted`), rollout seconds, iteration seconds, and the
update + weight-sync phase. `critical_path_added_s`: how much later that phase ends because of the draft,
measured inside each "on" run as the wait for the draft trainer after the policy update returned plus the
draft's part of the weight push (0 when fully overlapped); `update_sync_added_s` compares the phase across
the two runs instead (it also holds the CPU the draft trainer takes from the policy update on a small box).
Overrides after the options go to every run (e.g. draft.loss=ce_sampled); the JSON records them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

DRIFT_LR = 5e-4  # 5x the tiny default: the actor moves far from the draft's teacher within the run
STRATEGY = "tree:3,2,6"  # a static tree: accepted tokens per step then compare across iterations and runs
FULL = {"iterations": 32, "prompts": 32, "samples": 4, "repeats": 2}
QUICK = {"iterations": 8, "prompts": 8, "samples": 4, "repeats": 1}


def run_once(online: bool, sizes: dict, out_dir: Path, extra: list[str]) -> list[dict]:
    from configs.schema import load_config
    from trainer.run import run

    overrides = [f"trainer.actor_lr={DRIFT_LR}", f"generation.strategy={STRATEGY}", "trainer.algorithm=grpo",
                 f"trainer.iterations={sizes['iterations']}", f"trainer.prompts_per_iteration={sizes['prompts']}",
                 f"trainer.samples_per_prompt={sizes['samples']}", "trainer.save_every=0", "data.eval.path=null",
                 "tracking.wandb=false", "tracking.progress=false", f"trainer.output_dir={out_dir}",
                 f"draft.online={str(online).lower()}", *extra]
    return run(load_config(None, overrides))


def series(history: list[dict], key: str, default: float = 0.0) -> list[float]:
    return [float(h.get(key, default)) for h in history]


def quarter_means(values: list[float]) -> tuple[float, float]:
    q = max(1, len(values) // 4)
    return statistics.fmean(values[:q]), statistics.fmean(values[-q:])


def per_iteration_median(runs: list[list[float]]) -> list[float]:
    return [statistics.median(v) for v in zip(*runs)]


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    for mode, style in (("off", "o-"), ("on", "s-")):
        its = range(len(result[mode]["accepted_per_step"]))
        top.plot(its, result[mode]["accepted_per_step"], style, ms=3, label=f"draft.online={mode}")
        bottom.plot(its, result[mode]["iteration_s"], style, ms=3, label=f"draft.online={mode}")
    top.set_ylabel("accepted draft tokens / sample-step")
    top.set_title(f"tiny world, GRPO, actor lr {result['config']['actor_lr']:g}, {result['config']['strategy']}")
    top.legend()
    top.grid(alpha=0.3)
    bottom.set_ylabel("iteration seconds")
    bottom.set_xlabel("iteration")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON result; the PNG goes next to it")
    parser.add_argument("--quick", action="store_true", help="8 iterations of 8 prompts, one repeat (< 3 min)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per mode (default: 2, quick: 1)")
    parser.add_argument("--iterations", type=int, default=None, help="RLHF iterations per run (default: 32, quick: 8)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = parser.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    for key in ("repeats", "iterations"):
        if getattr(args, key):
            sizes[key] = getattr(args, key)
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    from configs.schema import load_config

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="draft_drift-"))  # the runs' output dirs; nothing in them is kept
    runs: dict[str, list[list[dict]]] = {"off": [], "on": []}
    started, load = time.time(), {}  # the machine's load average around each run: a shared box shows here
    for r in range(sizes["repeats"]):
        order = ("off", "on") if r % 2 == 0 else ("on", "off")  # interleaved, ABBA: slow drift hits both modes
        for mode in order:
            t0 = time.time()
            before = os.getloadavg()[0]
            history = run_once(mode == "on", sizes, work / f"{mode}-{r}", args.overrides)
            runs[mode].append([h for h in history if "rollout/mean_accepted" in h])
            load[f"{mode}-{r}"] = {"before": before, "after_1min": os.getloadavg()[0], "seconds": time.time() - t0}
            print(f"repeat {r} draft.online={mode}: {time.time() - t0:.0f} s", flush=True)

    shutil.rmtree(work, ignore_errors=True)
    result: dict = {}
    for mode, histories in runs.items():
        per_run = {
            "accepted_per_step": [series(h, "rollout/mean_accepted") for h in histories],
            "acceptance_rate": [series(h, "rollout/acceptance_rate") for h in histories],
            "rollout_s": [series(h, "time/generate") for h in histories],
            "iteration_s": [series(h, "time/iteration") for h in histories],
            "update_sync_s": [[a + b for a, b in zip(series(h, "time/update"), series(h, "time/weight_sync"))]
                              for h in histories],
            "kl": [series(h, "kl/mean") for h in histories],
            "score": [series(h, "score/mean") for h in histories],
        }
        if mode == "on":
            per_run.update({
                "draft_loss": [series(h, "draft/loss") for h in histories],
                "draft_train_s": [series(h, "draft/seconds") for h in histories],
                "policy_update_s": [series(h, "time/policy_update") for h in histories],
                "draft_wait_s": [series(h, "time/draft_wait") for h in histories],
                "draft_sync_s": [series(h, "time/draft_sync") for h in histories],
            })
        # acceptance and losses are the same in every repeat (seeded); times vary: per-iteration medians
        result[mode] = {k: per_iteration_median(v) for k, v in per_run.items()}
        result[mode]["repeats"] = per_run

    on, off = result["on"], result["off"]
    added = [w + s for w, s in zip(on["draft_wait_s"], on["draft_sync_s"])]
    first_on, last_on = quarter_means(on["accepted_per_step"])
    first_off, last_off = quarter_means(off["accepted_per_step"])
    mean_iteration = statistics.fmean(on["iteration_s"])
    cfg = load_config(None, [f"trainer.actor_lr={DRIFT_LR}", f"generation.strategy={STRATEGY}", *args.overrides])
    result.update({
        "config": {"actor_lr": DRIFT_LR, "strategy": STRATEGY, "algorithm": "grpo", "seed": cfg.seed, **sizes,
                   "draft": vars(cfg.draft), "overrides": args.overrides, "quick": args.quick},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads_per_actor": cfg.trainer.threads_per_actor,
                    "instances": cfg.generation.num_instances, "platform": platform.platform(),
                    "torch": torch.__version__, "wall_s": round(time.time() - started, 1), "runs": load},
        "critical_path_added_s": statistics.fmean(added),
        "critical_path_added_per_iteration_s": added,
        "update_sync_added_s": statistics.median(on["update_sync_s"]) - statistics.median(off["update_sync_s"]),
        "summary": {
            "accepted_first_quarter": {"off": first_off, "on": first_on},
            "accepted_last_quarter": {"off": last_off, "on": last_on},
            "on_vs_off_last_quarter": last_on / max(last_off, 1e-9),
            "critical_path_fraction": statistics.fmean(added) / mean_iteration,
            "draft_train_s": spread(on["draft_train_s"]),
            "policy_update_s": spread(on["policy_update_s"]),
            "iteration_s": {"off": spread(off["iteration_s"]), "on": spread(on["iteration_s"])},
            "rollout_s": {"off": spread(off["rollout_s"]), "on": spread(on["rollout_s"])},
        },
    })
    s = result["summary"]
    result["targets"] = {
        "last_quarter_at_least_first": last_on >= first_on,
        "last_quarter_10pct_above_off": s["on_vs_off_last_quarter"] >= 1.10,
        "critical_path_under_5pct": s["critical_path_fraction"] < 0.05,
    }
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print_table(result)
    return result


def print_table(result: dict) -> None:
    s = result["summary"]
    print(f"\n| mode | accepted/step first quarter | last quarter | iteration s (median) | rollout s (median) |")
    print("| --- | --- | --- | --- | --- |")
    for mode in ("off", "on"):
        print(f"| {mode} | {s['accepted_first_quarter'][mode]:.3f} | {s['accepted_last_quarter'][mode]:.3f} | "
              f"{s['iteration_s'][mode]['median']:.2f} | {s['rollout_s'][mode]['median']:.2f} |")
    print(f"\non/off last quarter: {s['on_vs_off_last_quarter']:.3f}; critical path added "
          f"{result['critical_path_added_s']:.3f} s/iteration ({100 * s['critical_path_fraction']:.1f}% of an "
          f"iteration); update+sync on-off {result['update_sync_added_s']:+.3f} s; draft trainer "
          f"{s['draft_train_s']['median']:.2f} s vs policy update {s['policy_update_s']['median']:.2f} s")
    print("targets:", json.dumps(result["targets"]))


if __name__ == "__main__":
    main()
