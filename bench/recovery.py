"""Recovery time per role: SIGKILL each role's worker process at a chosen phase of a tiny-world run
(bench/faults.py) and time the death to the next iteration logged after it; an uninterrupted run of the same
configuration gives the scores to compare and its iteration time.

    python -m bench.recovery --quick --out bench/results/recovery.json
"""
from __future__ import annotations

import argparse
import json
import time

GRPO_FAULTS = [("generation instance", "evaluation", 0), ("reference", "experience", 1), ("policy", "update", 1),
               ("generation instance", "rollout", 2), ("reward", "experience", 2), ("draft trainer", "update", 2),
               ("policy", "weight push", 3)]
PPO_FAULTS = [("load balancer", "moving samples", 0), ("critic", "update", 1)]
# the balancer on, an instance a destination only when idle: orders move running samples in every rollout
BALANCED = ["balancer.enabled=true", "balancer.threshold=1", "balancer.interval_s=0.05", "balancer.cooldown_s=0.2",
            "generation.assignment=chunk"]
SCORES = ("score/mean", "response/length_mean", "eval/score", "eval/sampled_score")


def one_run(overrides: list[str], faults: list[tuple]) -> tuple[list[dict], list[dict], float]:
    from bench import faults as fi
    from configs.schema import load_config
    from trainer.loop.run import run

    inj = fi.install([fi.Fault(*f) for f in faults])
    try:
        start = time.time()
        history = run(load_config(None, overrides))
        seconds = time.time() - start
    finally:
        inj.restore()
    return history, fi.recovery_seconds(inj), seconds


def scenario(name: str, overrides: list[str], faults: list[tuple], out_dir: str) -> dict:
    straight, _, straight_s = one_run(overrides + [f"trainer.output_dir={out_dir}/{name}-straight"], [])
    killed, rows, killed_s = one_run(overrides + [f"trainer.output_dir={out_dir}/{name}-killed"], faults)
    same = [[row.get(k) for k in SCORES] for row in killed] == [[row.get(k) for k in SCORES] for row in straight]
    iteration_s = [row["time/iteration"] for row in straight if "time/iteration" in row]
    return {"scenario": name, "faults": rows, "scores_identical": same, "uninterrupted_run_s": round(straight_s, 1),
            "run_with_faults_s": round(killed_s, 1),
            "uninterrupted_iteration_s": round(sum(iteration_s) / max(len(iteration_s), 1), 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 prompts x 2 samples per iteration (else 32 x 4)")
    ap.add_argument("--out", default="bench/results/recovery.json")
    ap.add_argument("--runs-dir", default="runs/bench-recovery")
    ap.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray cluster")
    args = ap.parse_args(argv)
    from trainer.loop.ray_setup import init_ray

    # logical CPUs as the test suite's cluster has (8): a run with two instances, the trainers, reference and
    # reward asks for more than this machine's 2 cores, and they take turns on them
    init_ray(num_cpus=args.num_cpus)
    size = (["trainer.prompts_per_iteration=8", "trainer.samples_per_prompt=2", "trainer.micro_batch_size=4"]
            if args.quick else ["trainer.prompts_per_iteration=32", "trainer.samples_per_prompt=4"])
    common = size + ["generation.max_slots=16", "tracking.progress=false", "generation.cpus_per_instance=1",
                     "trainer.cpus_per_actor=0.5", "generation.strategy=tree:3,2,6", "draft.full_budget=true",
                     "data.eval.size=8", "trainer.eval_every=2", "tracking.wandb=false", "trainer.max_restarts=8"]
    results = [
        scenario("grpo", common + ["trainer.algorithm=grpo", "trainer.iterations=5", "trainer.save_every=2",
                                   "generation.num_instances=2"], GRPO_FAULTS, args.runs_dir),
        scenario("ppo", common + ["trainer.algorithm=ppo", "trainer.iterations=2", "trainer.save_every=1",
                                  "generation.num_instances=2", "trainer.critic_warmup=0", *BALANCED], PPO_FAULTS,
                 args.runs_dir),
    ]
    report = {"command": "python -m bench.recovery" + (" --quick" if args.quick else ""),
              "measure": "to_restart_line_s: seconds from the SIGKILL to its restart line (the death found and "
                         "handled); to_next_iteration_s: to the next iteration logged after it (a rewind's redone "
                         "iterations included)", "scenarios": results}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    for s in results:
        for row in s["faults"]:
            print(f"{s['scenario']}: {row['role']} during {row['phase']} (iteration {row['iteration']}): restart "
                  f"line {row.get('to_restart_line_s')} s, next iteration {row.get('to_next_iteration_s')} s; "
                  f"scores identical: {s['scores_identical']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
