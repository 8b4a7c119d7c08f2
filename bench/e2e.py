"""End to end: the same RLHF run under five rollout configurations, on two workloads; what the rollout gains and what
nothing around it loses.

    python -m bench.e2e --out bench/results/e2e.json [--quick]

Configurations: `none` (plain decoding), `static` (the best fixed strategy of bench.rollout's rollout phase, read
from bench/results/rollout.json), `adaptive`, `adaptive+balancer`, and `all` (adds online draft adaptation,
draft.online; the others keep it off); `adaptive+rollout_drafts` and `rollout_drafts` (strategy none: the rollout's
chains alone, verified every step) add rollout drafts (generation.rollout_drafts on; the others off). Workload
`returning`: 32 training prompts, 8 per iteration, so that they come back every 4 iterations (history). Workloads: `default` = configs/tiny.yaml as it is; `sorted` = the tiny train
prompts in blocks of one iteration's batch, each block ordered by prompt length, read in file order (data.shuffle
false) and split over the instances in contiguous chunks (generation.assignment chunk) with slots for a quarter of a
chunk as in bench.reallocation, so one instance gets the long samples and queues form: the case reallocation is for.
Every run is the driver's loop (`trainer.run.train`) with the same seeds, prompts and iterations, on one set of
actors restarted as new ones before each run (`Actors`: trainers from a checkpoint saved before any update,
instances with new engines from the model files); configurations are interleaved within each repeat, their order
rotated.

Times are the driver's `time/*` metrics, averaged over the iterations after the first `--warmup` (none by default:
the actors are warm, so no iteration pays a process's first steps), then the median over repeats. Speed-ups are over
`none` of the same workload. amdahl_bound = the iteration speed-up the rollout's speed-up allows at `none`'s
generation share, if nothing outside the rollout changed; outside_rollout_overhead = how far the iteration is from
that (0 = the mechanisms cost nothing outside the rollout). Sampling is position-keyed, so every configuration must
draw `none`'s tokens: tokens_differing counts rollout tokens that differ from `none`'s first run (a flip diverges
the rest of the run, so first_difference says where the first one was)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

CONFIGS = ("none", "static", "adaptive", "adaptive+balancer", "all", "adaptive+rollout_drafts", "rollout_drafts")
WORKLOADS = ("default", "sorted", "returning")
RETURNING = (32, 8)  # the returning workload: 32 training prompts, 8 per iteration: they come back every 4
ROLLOUT_JSON = Path(__file__).resolve().parent / "results" / "rollout.json"
SLOTS_PER_CHUNK = 0.25  # sorted: bench.reallocation's slots per instance, a quarter of its chunk: queues form
PHASES = ("generate", "make_experience", "update", "weight_sync")  # time/iteration is their sum (+ ~0)


# ---- the arithmetic (pure: tests/test_e2e_bench.py) ----------------------------------------------------------
def phase_means(history: list[dict], warmup: int) -> dict:
    """Mean of every `time/*` metric over the iterations after the first `warmup` (the closing evaluation's
    row has none)."""
    rows = [m for m in history if "time/iteration" in m][warmup:]
    if not rows:
        raise ValueError(f"no timed iterations after the first {warmup}: raise trainer.iterations")
    keys = sorted({k for m in rows for k in m if k.startswith("time/")})
    return {k[len("time/"):]: statistics.mean(m[k] for m in rows if k in m) for k in keys}


def amdahl_bound(base_iteration_s: float, base_rollout_s: float, rollout_speedup: float) -> float:
    """Iteration speed-up when only the rollout gets `rollout_speedup` faster, at the baseline's generation
    share p: 1 / ((1 - p) + p / s)."""
    p = base_rollout_s / base_iteration_s
    return 1.0 / ((1.0 - p) + p / rollout_speedup)


def outside_rollout_overhead(iteration_s: float, rollout_s: float, base_iteration_s: float,
                             base_rollout_s: float) -> float:
    """Time added outside the rollout, as a fraction of what the iteration would take with the baseline's
    outside-rollout time: iteration_s / (base_iteration_s - base_rollout_s + rollout_s) - 1."""
    return iteration_s / (base_iteration_s - base_rollout_s + rollout_s) - 1.0


def token_differences(reference: list[list[list[int]]], other: list[list[list[int]]]) -> tuple[int, dict | None]:
    """Rollout tokens of `other` that differ from `reference` ([iteration][sample][position] token ids): differing
    aligned positions plus any length difference; and where the first one is (iteration, then sample order)."""
    if len(reference) != len(other):
        raise ValueError(f"runs differ in iterations: {len(reference)} vs {len(other)}")
    count, first = 0, None
    for it, (ref_batch, batch) in enumerate(zip(reference, other)):
        if len(ref_batch) != len(batch):
            raise ValueError(f"iteration {it}: {len(ref_batch)} vs {len(batch)} rollouts")
        for s, (a, b) in enumerate(zip(ref_batch, batch)):
            diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
            n = len(diff) + abs(len(a) - len(b))
            if n and first is None:
                first = {"iteration": it, "sample": s, "position": diff[0] if diff else min(len(a), len(b))}
            count += n
    return count, first


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (workload, configuration) from the runs' phase means: medians over repeats, ratios over the
    workload's `none`."""
    rows = []
    for workload in dict.fromkeys(r["workload"] for r in runs):
        mine = [r for r in runs if r["workload"] == workload]
        names = list(dict.fromkeys(r["name"] for r in mine))
        med = {n: {k: statistics.median(r["phase_s"][k] for r in mine if r["name"] == n)
                   for k in mine[[r["name"] for r in mine].index(n)]["phase_s"]} for n in names}
        if "none" not in med:
            raise ValueError(f"workload {workload}: no `none` run to compare against")
        base = med["none"]
        for n in names:
            it, ro = med[n]["iteration"], med[n]["generate"]
            speedup = base["generate"] / ro
            own = [r for r in mine if r["name"] == n]
            worst = max(own, key=lambda r: r["tokens_differing"])
            rows.append({
                "name": n, "workload": workload, "iteration_s": it, "rollout_s": ro,
                "phase_s": {k: v for k, v in med[n].items() if k != "iteration"},
                "rollout_speedup": speedup, "iteration_speedup": base["iteration"] / it,
                "amdahl_bound": amdahl_bound(base["iteration"], base["generate"], speedup),
                "outside_rollout_overhead": outside_rollout_overhead(it, ro, base["iteration"], base["generate"]),
                "final_score": statistics.median(r["final_score"] for r in own),
                "final_sampled_score": statistics.median(r["final_sampled_score"] for r in own),
                "tokens_differing": worst["tokens_differing"], "first_difference": worst["first_difference"],
                "rollout_tokens": own[0]["rollout_tokens"],
                **rollout_draft_figures(own),
                "spread": {"iteration_s": [r["phase_s"]["iteration"] for r in own],
                           "rollout_s": [r["phase_s"]["generate"] for r in own]},
                "repeats": len(own)})
    return rows


def rollout_draft_figures(runs: list[dict]) -> dict:
    """Rollout drafts' figures of a configuration's runs (medians over repeats), by iteration: chain tokens per
    sample-step (in all and from the history) and the history hit rate; {} where they were off."""
    per = [r.get("per_iteration", []) for r in runs]
    if not any("rollout/chain_tokens_per_step" in m for p in per for m in p):
        return {}
    out = {}
    for key in ("rollout/chain_tokens_per_step", "rollout/chain_tokens_per_step_history", "rollout/history_hit_rate"):
        out[key.split("/")[1] + "_by_iteration"] = [statistics.median(p[i].get(key, 0.0) for p in per)
                                                    for i in range(min(len(p) for p in per))]
    return out


def check_targets(rows: list[dict]) -> dict:
    get = lambda w, n: next((r for r in rows if r["workload"] == w and r["name"] == n), None)  # noqa: E731
    out = {"outside_rollout_overhead <= 0.03 (all)": all(r["outside_rollout_overhead"] <= 0.03 for r in rows)}
    for w in dict.fromkeys(r["workload"] for r in rows):
        a, s = get(w, "all"), get(w, "static")
        if a and s:
            out[f"{w}: all rollout <= static rollout"] = a["rollout_s"] <= s["rollout_s"]
        if a:
            out[f"{w}: all rollout < none rollout"] = a["rollout_speedup"] > 1.0
    out["same tokens as none (all)"] = all(r["tokens_differing"] == 0 for r in rows)
    return out


# ---- the runs -------------------------------------------------------------------------------------------------
def static_strategy(path: Path = ROLLOUT_JSON) -> str:
    """The best fixed strategy of bench.rollout's rollout phase (its `oracle` row)."""
    try:
        rows = json.loads(path.read_text())["rows"]
        return next(r["oracle_of"] for r in rows if r["phase"] == "rollout" and r["name"] == "oracle")
    except (OSError, KeyError, StopIteration, ValueError) as e:
        raise SystemExit(f"{path}: no rollout-phase oracle row ({e!r}); run python -m bench.rollout first "
                         f"or pass --static STRATEGY")


def config_overrides(name: str, static: str) -> list[str]:
    """Rollout drafts only where the configuration names them (tiny.yaml's `auto` would turn them on with adaptive)."""
    strategy = {"none": "none", "static": static, "rollout_drafts": "none"}.get(name, "adaptive")
    return [f"generation.strategy={strategy}", f"balancer.enabled={name in ('adaptive+balancer', 'all')}".lower(),
            f"draft.online={name == 'all'}".lower(),
            f"generation.rollout_drafts={'on' if name.endswith('rollout_drafts') else 'off'}"]


def write_sorted_prompts(path: Path, batches: int, batch_size: int) -> None:
    """The tiny train prompts in blocks of one iteration's batch, each block ordered by prompt length as
    bench.reallocation orders its sorted_chunk batch."""
    from bench.reallocation import orderings, tiny_batch
    from trainer.tiny import task

    world, prompts, _ = tiny_batch(batches * batch_size, seed=0)
    rows = task.read_prompts_jsonl(world.train_prompts)[:batches * batch_size]
    if len(rows) < batches * batch_size:
        raise SystemExit(f"{world.train_prompts}: {len(rows)} prompts, {batches * batch_size} needed")
    with open(path, "w") as f:
        for b in range(batches):
            block = list(range(b * batch_size, (b + 1) * batch_size))
            name, _, by_len = orderings([prompts[i] for i in block], 0, 0)[0]
            assert name == "sorted_chunk"
            f.writelines(json.dumps(rows[block[i]]) + "\n" for i in by_len)


def workload_overrides(workload: str, prompt_file: Path, prompts: int, instances: int = 2) -> list[str]:
    if workload == "default":
        return []
    if workload == "returning":  # an epoch of 4 iterations: history from the first epoch on
        return [f"data.train.size={RETURNING[0]}", f"trainer.prompts_per_iteration={RETURNING[1]}"]
    slots = max(1, int(prompts * 4 / instances * SLOTS_PER_CHUNK))
    return [f"data.train.path={prompt_file}", "data.shuffle=false", "generation.assignment=chunk",
            f"generation.max_slots={slots}"]


@contextlib.contextmanager
def recording_rollouts():
    """Every rollout's token ids per iteration, as the driver hands them to training: Driver.generate wrapped
    for the run (read, never changed; a few microseconds inside the timed phase)."""
    from trainer.loop.driver import Driver

    original, seen = Driver.generate, []

    def generate(self, prompts, iteration):
        rollouts, metrics = original(self, prompts, iteration)
        seen.append([list(r.token_ids) for r in rollouts])
        return rollouts, metrics

    Driver.generate = generate
    try:
        yield seen
    finally:
        Driver.generate = original


RESTARTABLE = ("generation.strategy", "generation.max_slots", "generation.assignment", "balancer.enabled",
               "draft.online", "data.train.path", "data.shuffle", "trainer.output_dir", "generation.rollout_drafts",
               "data.train.size", "trainer.prompts_per_iteration")


def _flat(d: dict, prefix: str = "") -> dict:
    return {k: v for key, val in d.items()
            for k, v in (_flat(val, f"{prefix}{key}.").items() if isinstance(val, dict) else [(prefix + key, val)])}


def restart_differences(base: dict, cfg: dict) -> list[str]:
    """Settings (dotted) in which a run's configuration differs from the one its actors were made with, other
    than the RESTARTABLE ones: a run on reused actors must differ in none."""
    a, b = _flat(base), _flat(cfg)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not k.startswith(RESTARTABLE))


def run_config(overrides: list[str], out_dir: str):
    from configs.schema import load_config

    return load_config(None, overrides + [f"trainer.output_dir={out_dir}", "tracking.progress=false",
                                          "tracking.wandb=false", "trainer.save_every=0", "trainer.eval_every=0"])


class Actors:
    """One set of actors for every run of the measurement, each run starting them as new ones: the policy (and
    critic) and the draft trainer load a checkpoint saved before any update, the instances make new engines from
    the model files (`RolloutFleet.restart`). New actors per run spent about 30 s of each run starting processes
    on 2 cores, half of a --quick run. Runs may differ only in RESTARTABLE settings; the set is made with the
    draft trainer (`all` needs it; the others leave it out of their runs)."""

    def __init__(self, cfg, tmp: str):
        import ray

        from configs.schema import adapts_draft
        from trainer.loop.checkpoint import CheckpointManager
        from trainer.loop.preflight import resolve_paths
        from trainer.loop.run import build_actors

        if not adapts_draft(cfg):
            raise ValueError("bench.e2e builds its actors from a configuration whose draft adapts online")
        self.cfg, self.initial = cfg, Path(tmp) / "initial"
        a = self.actors = build_actors(cfg, resolve_paths(cfg))
        self.checkpoints = CheckpointManager(tmp, 0, a.policy, a.critic, a.draft)
        ray.get(self.checkpoints.trainer_calls("save_checkpoint", self.initial))

    def restart(self, cfg):
        """The actors as new ones for a run of `cfg` (an RLActors; the draft trainer only where the draft adapts)."""
        from dataclasses import replace

        import ray

        from configs.schema import adapts_draft

        differ = restart_differences(self.cfg.to_dict(), cfg.to_dict())
        if differ:
            raise ValueError(f"bench.e2e: runs on one set of actors may not differ in {', '.join(differ)}")
        ray.get(self.checkpoints.trainer_calls("load_checkpoint", self.initial))
        self.actors.fleet.restart(cfg.generation, cfg.balancer)
        return replace(self.actors, draft=self.actors.draft if adapts_draft(cfg) else None)

    def shutdown(self) -> None:
        self.actors.shutdown()


def run_one(actors: Actors, cfg) -> tuple[list[dict], list]:
    from trainer.loop.preflight import preflight
    from trainer.loop.run import train

    checked = preflight(cfg, log=lambda *a, **k: None)
    with recording_rollouts() as tokens:
        history = train(cfg, actors.restart(cfg), checked)
    return history, tokens


def measure(args, static: str, log) -> list[dict]:
    """Every (repeat, workload, configuration) run, on one set of actors; each run's record is also appended to
    `args.runs_file` as it ends, so a long measurement that breaks off can still be summarised (--from-runs)."""
    runs, reference = [], {}
    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        prompt_file = Path(tmp) / "sorted.jsonl"
        write_sorted_prompts(prompt_file, args.iterations, args.prompts)
        common = [f"trainer.iterations={args.iterations}", f"trainer.prompts_per_iteration={args.prompts}",
                  f"data.eval.size={args.eval_size}", f"seed={args.seed}"]

        def config(workload: str, name: str, rep: int):
            overrides = (common + workload_overrides(workload, prompt_file, args.prompts)
                         + config_overrides(name, static))
            return run_config(overrides, os.path.join(tmp, f"{workload}-{name}-{rep}"))

        actors = Actors(config(args.workloads[0], "all", -1), tmp)
        try:
            for rep in range(args.repeats):
                for workload in args.workloads:
                    k = rep % len(args.configs)  # rotate: no configuration always runs first; `none` first in rep 0
                    for name in args.configs[k:] + args.configs[:k]:
                        t0 = time.perf_counter()
                        history, tokens = run_one(actors, config(workload, name, rep))
                        if name == "none" and workload not in reference:
                            reference[workload] = tokens
                        run = run_record(workload, name, rep, time.perf_counter() - t0, history, tokens,
                                         reference[workload], args.warmup)
                        runs.append(run)
                        with open(args.runs_file, "a") as f:
                            f.write(json.dumps(run) + "\n")
                        log(run)
        finally:
            actors.shutdown()
    return runs


def run_record(workload: str, name: str, rep: int, wall_s: float, history: list[dict], tokens: list,
               reference: list, warmup: int) -> dict:
    final = history[-1] if "time/iteration" not in history[-1] else {}
    differing, first = token_differences(reference, tokens)
    return {"workload": workload, "name": name, "repeat": rep, "wall_s": wall_s,
            "phase_s": phase_means(history, warmup),
            "final_score": final.get("eval/score"), "final_sampled_score": final.get("eval/sampled_score"),
            "tokens_differing": differing, "first_difference": first,
            "rollout_tokens": sum(len(t) for batch in tokens for t in batch),
            "load_avg": os.getloadavg(),  # this machine is shared: how busy it was
            "per_iteration": [{k: v for k, v in m.items() if k.startswith(("time/", "rollout/", "drafting/",
                                                                           "balance/", "draft/", "response/",
                                                                           "reward/"))}
                              for m in history if "time/iteration" in m]}


def ensure_calibration() -> None:
    """The tiny pair's step-time calibration, profiled here once if this machine has none: otherwise the first
    `adaptive` run would profile on first use inside its timed iterations (decoding with the fallback
    meanwhile), which every later run, and every later run of a user's, is spared."""
    import torch

    from configs.schema import load_config
    from drafting import SpeculativeEngine
    from drafting.calibrate.first_use import resolve_calibration
    from trainer.loop.preflight import resolve_paths

    cfg = load_config(None, [])
    paths, g = resolve_paths(cfg), cfg.generation
    threads = torch.get_num_threads()
    torch.set_num_threads(g.threads_per_instance)
    try:
        engine = SpeculativeEngine(paths.actor, paths.draft, strategy="none", max_slots=g.max_slots,
                                   max_len=g.max_len, dtype=getattr(torch, cfg.model.dtype))
        cal = resolve_calibration(engine, "auto", getattr(g, "profile_budget_s", None))
        print(f"calibration of the tiny pair: {cal.path or 'profiled now, cached'} (step CV error "
              f"{cal.step_cv_error:.1%})", flush=True)
    finally:
        torch.set_num_threads(threads)


def start_ray(tries: int = 3) -> None:
    """Ray gives its raylet 30 s to register: on a loaded machine (this one is shared) that can fail. A failed
    start leaves its GCS and helpers running, and ray.shutdown() does not know them: they are ended here."""
    import psutil

    from trainer.loop.ray_setup import init_ray

    me = psutil.Process()
    for attempt in range(tries):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            init_ray()
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == tries - 1:
                raise
            print(f"Ray did not start in time (try {attempt + 1} of {tries}); again", flush=True)
            for p in me.children(recursive=True):
                if p.pid not in before:
                    p.kill()


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.2), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        mine = [r for r in rows if r["workload"] == w]
        bottom = [0.0] * len(mine)
        for phase in PHASES:
            vals = [r["phase_s"].get(phase, 0.0) for r in mine]
            ax.bar(range(len(mine)), vals, bottom=bottom, label=phase)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for i, r in enumerate(mine):
            ax.text(i, bottom[i], f"{r['iteration_s']:.2f}s\nroll x{r['rollout_speedup']:.2f}", ha="center",
                    va="bottom", fontsize=7)
        ax.set_xticks(range(len(mine)), [r["name"] for r in mine], rotation=20, fontsize=8)
        ax.set_ylabel("seconds per iteration (median of repeats)")
        ax.set_title(f"workload: {w}")
        ax.set_ylim(0, max(bottom) * 1.2)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write (a PNG goes beside it)")
    ap.add_argument("--quick", action="store_true", help="2 iterations of 8 prompts x 4, eval on 32, one repeat")
    ap.add_argument("--iterations", type=int, default=None, help="RLHF iterations per run (default 8, quick 2)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per iteration (default 32, quick 8)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per configuration (default 2, quick 1)")
    ap.add_argument("--warmup", type=int, default=0, help="first iterations left out of the times (the actors "
                    "are warm: every run restarts one set)")
    ap.add_argument("--eval-size", type=int, default=None, help="held-out prompts scored at the end (256, quick 32)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="default,sorted or one of them")
    ap.add_argument("--static", default=None, help="the static strategy (default: bench.rollout's oracle)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--from-runs", default=None, help="summarise the run records of an earlier measurement "
                    "(OUT.runs.jsonl) instead of running")
    args = ap.parse_args(argv)
    args.iterations = args.iterations or (2 if args.quick else 8)
    args.prompts = args.prompts or (8 if args.quick else 32)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.eval_size = args.eval_size or (32 if args.quick else 256)
    args.configs = sorted(args.configs.split(","), key=lambda c: c != "none")  # the reference runs first
    args.workloads = args.workloads.split(",")
    for c in args.configs:
        if c not in CONFIGS:
            ap.error(f"--configs: {c!r} is not one of {', '.join(CONFIGS)}")
    for w in args.workloads:
        if w not in WORKLOADS:
            ap.error(f"--workloads: {w!r} is not one of {', '.join(WORKLOADS)}")
    if "none" not in args.configs:
        ap.error("--configs: `none` is the baseline every ratio needs")
    if args.iterations <= args.warmup:
        ap.error(f"--iterations: {args.iterations} leaves no timed iteration after --warmup {args.warmup}")
    os.environ.setdefault("WANDB_MODE", "offline")
    static = args.static or static_strategy()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    args.runs_file = out.with_suffix(".runs.jsonl")
    t0 = time.time()

    def log(run):
        p = run["phase_s"]
        print(f"[{run['workload']:<7} {run['name']:<17} rep {run['repeat']}] iteration {p['iteration']:.2f}s "
              f"generate {p['generate']:.2f}s experience {p['make_experience']:.2f}s update {p['update']:.2f}s "
              f"sync {p['weight_sync']:.2f}s  score {run['final_score']}  differing {run['tokens_differing']}  "
              f"(run {run['wall_s']:.0f}s)", flush=True)

    if args.from_runs:
        runs = [json.loads(line) for line in Path(args.from_runs).read_text().splitlines() if line.strip()]
    else:
        ensure_calibration()
        start_ray()
        args.runs_file.unlink(missing_ok=True)
        runs = measure(args, static, log)
    rows = summarize(runs)
    result = {"configs": rows, "targets": check_targets(rows), "runs": runs,
              "amdahl_limit": {w: 1.0 / (1.0 - r["rollout_s"] / r["iteration_s"]) for r in rows
                               if r["name"] == "none" for w in [r["workload"]]},
              "config": {"quick": args.quick, "iterations": args.iterations, "prompts_per_iteration": args.prompts,
                         "samples_per_prompt": 4, "repeats": args.repeats, "warmup": args.warmup,
                         "eval_size": args.eval_size, "static": static, "seed": args.seed,
                         "wall_s": time.time() - t0, "machine": platform.machine(), "cpus": os.cpu_count(),
                         "platform": platform.platform(), "load_avg_at_end": os.getloadavg(),
                         "threads": "1 torch thread per actor and per generation instance (configs/tiny.yaml)"}}
    out.write_text(json.dumps(result, indent=1))
    plot(rows, out.with_suffix(".png"))
    print(f"\n{'workload':<9}{'config':<19}{'iter s':>8}{'roll s':>8}{'roll x':>8}{'iter x':>8}{'amdahl':>8}"
          f"{'overhead':>10}{'score':>7}{'differ':>8}")
    for r in rows:
        print(f"{r['workload']:<9}{r['name']:<19}{r['iteration_s']:>8.2f}{r['rollout_s']:>8.2f}"
              f"{r['rollout_speedup']:>8.3f}{r['iteration_speedup']:>8.3f}{r['amdahl_bound']:>8.3f}"
              f"{r['outside_rollout_overhead']:>+10.3f}{r['final_score'] or float('nan'):>7.3f}"
              f"{r['tokens_differing']:>8}")
    print("targets:", json.dumps(result["targets"]))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
