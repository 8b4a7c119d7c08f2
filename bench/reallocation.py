"""Sample reallocation: rollout makespan with the load balancer off, two-stage and stop-and-copy, for three ways
of splitting a batch, plus the frozen time of migrating samples whose KV is large.

    python -m bench.reallocation --out bench/results/reallocation.json [--quick]

Workload: the tiny world's train prompts (digit lists of geometric length, so long-tailed responses), GRPO-sized:
`prompts` prompts x 4 samples at temperature 1.0 with per-request seeds, over 2 generation instances of one torch
thread each (the tiny default's strategy), with fewer slots than requests per instance so queues drain and then
the tail runs. The balancer runs with its defaults (threshold auto, the polling interval and cooldown of
`BalancerConfig`). Assignments: sorted_chunk (contiguous chunks of a batch ordered by prompt length),
random_chunk (chunks of a shuffled batch; median over shuffles) and round_robin. Every (assignment, mode) pair
runs in one process on the same two instances, interleaved, with the mode order rotated per repeat; every run
of one batch must give the same tokens. Frozen time: orders issued from here move one sample while both
instances decode (two-stage and stop-and-copy alternating), in the tiny world and with a random 32-layer model
whose one-sample KV is >= 64 MB, as an 8B model's long samples have."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

ASSIGNMENTS = ("sorted_chunk", "random_chunk", "round_robin")
MODES = ("off", "two_stage", "stop_copy")
SAMPLES_PER_PROMPT = 4


def spread(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q[0], "q3": q[2], "n": len(xs)}


THRESHOLD = "auto"  # --threshold


def balancer_for(mode: str):
    from configs.schema import BalancerConfig

    return BalancerConfig(enabled=mode != "off", two_stage=mode != "stop_copy", threshold=THRESHOLD)


def tiny_batch(n_prompts: int, seed: int):
    """Prompts (token ids) from the tiny world's train file and the rollout's requests, GRPO groups adjacent."""
    from transformers import AutoTokenizer

    from trainer.tiny import task
    from trainer.tiny.bootstrap import ensure_tiny_world

    world = ensure_tiny_world(quiet=True)
    tok = AutoTokenizer.from_pretrained(world.tokenizer_path)
    rows = task.read_prompts_jsonl(world.train_prompts)[:n_prompts]
    prompts = [tok(r["prompt"])["input_ids"] for r in rows]
    return world, prompts, task.MAX_LEN + 1


def requests_for(prompts: list[list[int]], order: list[int], max_new: int, tag: str):
    """Requests in dataset order `order` (prompt indices); a request's seed depends on its prompt and sample only,
    so every ordering of one batch must produce the same tokens."""
    from drafting import GenRequest, SamplingParams

    out = []
    for p in order:
        for s in range(SAMPLES_PER_PROMPT):
            sp = SamplingParams(temperature=1.0, max_new_tokens=max_new, seed=1_000_003 * p + s)
            out.append(GenRequest(f"{tag}:{p}:{s}", list(prompts[p]), sp))
    return out


def orderings(prompts: list[list[int]], shuffles: int, seed: int) -> list[tuple[str, str, list[int]]]:
    """(assignment name, fleet assignment, prompt order): the dataset orders the three assignments see."""
    n = len(prompts)
    by_len = sorted(range(n), key=lambda p: (len(prompts[p]), p))
    out = [("sorted_chunk", "chunk", by_len)]
    for k in range(shuffles):
        order = list(range(n))
        random.Random(seed + k).shuffle(order)
        out.append((f"random_chunk#{k}", "chunk", order))
    out.append(("round_robin", "round_robin", list(range(n))))
    return out


def instance_steps(fleet) -> list[tuple[int, float]]:
    return [(s.steps, s.step_ms) for s in fleet.stats()]


def run_tiny(args) -> dict:
    from configs.schema import GenerationConfig
    from trainer.loop.rollout import RolloutFleet

    n_prompts = args.prompts or (32 if args.quick else 64)
    slots = args.slots or (16 if args.quick else 32)
    world, prompts, max_new = tiny_batch(n_prompts, args.seed)
    gen = GenerationConfig(num_instances=2, max_slots=slots, max_len=160, cpus_per_instance=1,
                           threads_per_instance=1)
    fleet = RolloutFleet(gen, world.actor_path, world.draft_path, "float32", balancer_for("two_stage"))
    configs = orderings(prompts, args.shuffles, args.seed)
    # warm-up: every instance has decoded and migrated once before anything is timed
    fleet.assignment = "chunk"
    fleet.run(requests_for(prompts, configs[0][2][: max(8, n_prompts // 4)], max_new, "warm"),
              group_size=SAMPLES_PER_PROMPT)
    runs, tokens_of, example_log = [], {}, None
    for rep in range(args.repeats):
        for c, (name, assignment, order) in enumerate(configs):
            modes = MODES[(rep + c) % 3:] + MODES[:(rep + c) % 3]  # rotate: no mode always runs first
            for mode in modes:
                fleet.set_balancer(balancer_for(mode))
                fleet.assignment = assignment
                reqs = requests_for(prompts, order, max_new, f"{rep}")
                before = instance_steps(fleet)
                t0 = time.perf_counter()
                outs = fleet.run(reqs, group_size=SAMPLES_PER_PROMPT)
                makespan = time.perf_counter() - t0
                after = instance_steps(fleet)
                steps = [a[0] - b[0] for a, b in zip(after, before)]
                step_ms = [(a[0] * a[1] - b[0] * b[1]) / max(a[0] - b[0], 1) for a, b in zip(after, before)]
                key = {o.request_id.split(":", 1)[1]: o.token_ids for o in outs}
                same = tokens_of.setdefault("batch", key) == key
                report = fleet.last_balance or {}
                running = [r for r in report.get("orders", []) if r["order"]["kind"] == "running" and r["moved"]]
                queued = [r for r in report.get("orders", []) if r["order"]["kind"] == "queued" and r["moved"]]
                row = {"assignment": name.split("#")[0], "ordering": name, "mode": mode, "repeat": rep,
                       "makespan_s": makespan, "steps_per_instance": steps, "step_ms_per_instance": step_ms,
                       "migrations": len(running) + len(queued),
                       "samples_moved": sum(len(r["moved"]) for r in running),
                       "requests_moved": sum(len(r["moved"]) for r in queued),
                       "bytes_moved": sum(r["bytes"] for r in report.get("orders", [])),
                       "frozen_ms": [r["frozen_ms"] for r in running if r["frozen_ms"] is not None],
                       "stage1_ms": [r["stage1_ms"] for r in running], "stage2_ms": [r["stage2_ms"] for r in running],
                       "failed_orders": sum(r["outcome"] == "aborted" for r in report.get("orders", [])),
                       "same_tokens_as_first_run": same, "thresholds": report.get("thresholds", {})}
                runs.append(row)
                if name == "sorted_chunk" and mode == "two_stage" and example_log is None:
                    example_log = fleet.balance_log()
                print(f"{name:<15}{mode:<10} {makespan:6.2f} s  steps {steps}  step {statistics.mean(step_ms):5.1f} ms"
                      f"  moved {row['requests_moved']} queued + {row['samples_moved']} running"
                      f"  {row['bytes_moved'] / 1e6:6.2f} MB  same tokens {same}", flush=True)
    try:
        migrations = run_tiny_migrations(fleet, prompts, max_new, args.large_repeats or (3 if args.quick else 6))
    finally:
        fleet.shutdown()
    return {"runs": runs, "example_log": example_log or [], "migrations": migrations,
            "workload": {"source": f"tiny world at {world.root} (train prompts)", "prompts": n_prompts,
                         "samples_per_prompt": SAMPLES_PER_PROMPT, "requests": n_prompts * SAMPLES_PER_PROMPT,
                         "instances": 2, "threads_per_instance": 1, "max_slots": slots, "max_new_tokens": max_new,
                         "strategy": gen.strategy, "temperature": 1.0, "shuffles": args.shuffles,
                         "prompt_lens": [len(p) for p in prompts],
                         "balancer": vars(balancer_for("two_stage"))}}


# ---- large KV -------------------------------------------------------------------------------------------------
def large_models(root: Path) -> tuple[str, str, int]:
    """A random 32-layer target with 8 KV heads of 128 (256 KB of K/V per token) and a 1-layer draft."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def save(name, layers, hidden, heads, kv, head_dim, seed):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                          max_position_embeddings=512, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        LlamaForCausalLM(cfg).eval().save_pretrained(root / name)
        return str(root / name)

    kv_bytes_per_token = 2 * 32 * 8 * 128 * 4
    return save("target", 32, 256, 8, 8, 128, 0), save("draft", 1, 128, 4, 2, 32, 1), kv_bytes_per_token


def manual(mode: str):
    """Balancer settings for orders issued from here: a numeric threshold (no profile of the model pair needed)."""
    return dataclasses.replace(balancer_for(mode), threshold=1)


def migrate_while_decoding(fleet, label: str, repeats: int, batch, bytes_per_token: int | None = None) -> dict:
    """Manual orders, two-stage and stop-and-copy alternating, each moving one sample from instance 0 to 1 while
    both decode: instance 0 runs `moving` among others, instance 1 its own, so the freeze meets a busy destination
    as it would in a rollout. batch(rep) -> (moving prompt, other prompts at 0, prompts at 1, max_new, busy_new)."""
    import ray

    from drafting import GenRequest, SamplingParams

    src, dst = fleet.instances[:2]
    rows, tokens = [], {}
    for rep in range(repeats):
        for mode in (("two_stage", "stop_copy") if rep % 2 == 0 else ("stop_copy", "two_stage")):
            fleet.set_balancer(manual(mode))
            moving_prompt, others, busy, max_new, busy_new = batch(rep)
            sp = lambda k, n: SamplingParams(temperature=1.0, max_new_tokens=n, seed=97 * rep + k)  # noqa: E731
            moving = f"{label}:{mode}:{rep}:moving"
            at_src = [GenRequest(moving, moving_prompt, sp(0, max_new))]
            at_src += [GenRequest(f"{label}:{mode}:{rep}:src{k}", p, sp(k + 1, max_new)) for k, p in enumerate(others)]
            at_dst = [GenRequest(f"{label}:{mode}:{rep}:dst{k}", p, sp(k + 100, busy_new)) for k, p in enumerate(busy)]
            ray.get([src.submit.remote(at_src), dst.submit.remote(at_dst)])
            deadline = time.monotonic() + 300
            while True:  # the sample a few tokens in (the destination decodes its own: recorded per row)
                loads = ray.get([src.load.remote(), dst.load.remote()])
                generated = {s.request_id: s.generated for s in loads[0].samples}
                if generated.get(moving, 0) >= 3:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{label}: samples did not start decoding: {loads}")
                time.sleep(0.005)
            kv_tokens = next(s.kv_tokens for s in loads[0].samples if s.request_id == moving)
            result = fleet.migrate(0, 1, [moving], reason=f"{label} measurement ({mode})")
            done = []
            while len(done) < len(at_src) + len(at_dst):
                for inst in (src, dst):
                    done += ray.get(inst.collect.remote(0.2))
                if time.monotonic() > deadline + 300:
                    raise RuntimeError(f"{label}: {len(done)} of {len(at_src) + len(at_dst)} requests came back")
            out = next(o for o in done if o.request_id == moving)
            tokens.setdefault(rep, []).append(out.token_ids)
            row = {"mode": mode, "repeat": rep, "outcome": result.outcome, "kv_tokens": kv_tokens,
                   "bytes": result.bytes, "stage1_ms": result.stage1_ms, "stage2_ms": result.stage2_ms,
                   "frozen_ms": result.frozen_ms, "finished_on": out.stats.get("instance"),
                   "destination_live": loads[1].live}
            if bytes_per_token:
                row["kv_mb"] = kv_tokens * bytes_per_token / 1e6
            rows.append(row)
            print(f"{label} {mode:<10} {result.outcome}: {kv_tokens} KV tokens, sent {result.bytes / 1e6:.2f} MB, "
                  f"stage 1 {result.stage1_ms:.1f} ms, stage 2 {result.stage2_ms:.1f} ms, "
                  f"frozen {result.frozen_ms if result.frozen_ms is not None else float('nan'):.1f} ms", flush=True)
    return {"rows": rows, "step_ms_mean": statistics.mean(s.step_ms for s in fleet.stats()),
            "same_tokens_both_modes": all(len({tuple(t) for t in ts}) == 1 for ts in tokens.values())}


def run_tiny_migrations(fleet, prompts: list[list[int]], max_new: int, repeats: int) -> dict:
    """Frozen time in the tiny world: one long sample moves while 7 others decode beside it and 4 at the
    destination."""
    long = sorted(range(len(prompts)), key=lambda p: -len(prompts[p]))

    def batch(rep):
        rng = random.Random(rep)
        pick = lambda n: [prompts[rng.randrange(len(prompts))] for _ in range(n)]  # noqa: E731
        return prompts[long[rep % 4]], pick(7), pick(4), max_new, max_new

    return migrate_while_decoding(fleet, "tiny", repeats, batch)


def run_large_kv(args) -> dict:
    from configs.schema import GenerationConfig
    from trainer.loop.rollout import RolloutFleet

    repeats = args.large_repeats or (3 if args.quick else 6)
    prompt_len, max_new, busy_new = 260, 24, 64
    with tempfile.TemporaryDirectory() as tmp:
        target, draft, per_token = large_models(Path(tmp))
        # a static strategy: adaptive would first profile a model that exists only to hold large K/V
        gen = GenerationConfig(num_instances=2, strategy="tree:3,2,6", max_slots=4, max_len=prompt_len + busy_new + 8,
                               cpus_per_instance=1, threads_per_instance=1)
        fleet = RolloutFleet(gen, target, draft, "float32", manual("two_stage"))

        def batch(rep):
            rng = random.Random(rep)
            prompt = lambda: [rng.randrange(1, 512) for _ in range(prompt_len)]  # noqa: E731
            return prompt(), [prompt()], [prompt()], max_new, busy_new

        try:
            out = migrate_while_decoding(fleet, "large-KV", repeats, batch, per_token)
        finally:
            fleet.shutdown()
    out["model"] = {"layers": 32, "kv_heads": 8, "head_dim": 128, "hidden": 256, "dtype": "float32",
                    "target_kv_bytes_per_token": per_token, "prompt_len": prompt_len, "max_new_tokens": max_new,
                    "draft": "1 layer, hidden 128"}
    return out


# ---- summary --------------------------------------------------------------------------------------------------
def summarize(tiny: dict, large: dict | None) -> dict:
    runs = tiny["runs"]
    cell = lambda a, m, key="makespan_s": [r[key] for r in runs if r["assignment"] == a and r["mode"] == m]  # noqa
    out = {"makespan_s": {}, "makespan_spread": {}, "migrations": {}, "samples_moved": {}, "requests_moved": {},
           "bytes_moved": {}}
    for a in ASSIGNMENTS:
        for m in MODES:
            key = f"{a}/{m}"
            out["makespan_s"][key] = statistics.median(cell(a, m))
            out["makespan_spread"][key] = spread(cell(a, m))
            for k in ("migrations", "samples_moved", "requests_moved", "bytes_moved"):
                out[k][key] = statistics.median(cell(a, m, k))

    def ratio(ordering: str) -> float:
        off = statistics.median(r["makespan_s"] for r in runs if r["ordering"] == ordering and r["mode"] == "off")
        on = statistics.median(r["makespan_s"] for r in runs if r["ordering"] == ordering and r["mode"] == "two_stage")
        return off / on

    shuffles = sorted({r["ordering"] for r in runs if r["assignment"] == "random_chunk"})
    out["speedup_skewed"] = ratio("sorted_chunk")
    out["speedup_random_chunk"] = statistics.median(ratio(s) for s in shuffles)
    out["speedup_random_chunk_per_shuffle"] = {s: ratio(s) for s in shuffles}
    out["speedup_round_robin"] = ratio("round_robin")
    out["speedup_skewed_stop_copy"] = statistics.median(cell("sorted_chunk", "off")) / statistics.median(
        cell("sorted_chunk", "stop_copy"))
    step_ms = [ms for r in runs for ms, n in zip(r["step_ms_per_instance"], r["steps_per_instance"]) if n > 0]
    out["step_ms_median"] = statistics.median(step_ms)
    out["rollout_steps_median"] = statistics.median(max(r["steps_per_instance"]) for r in runs if r["mode"] == "off")
    for mode in ("two_stage", "stop_copy"):  # measured orders, one long sample moving while both instances decode
        rows = tiny["migrations"]["rows"]
        frozen = [r["frozen_ms"] for r in rows if r["mode"] == mode and r["frozen_ms"] is not None]
        out[f"frozen_ms_median_{mode}"] = statistics.median(frozen) if frozen else None
        out[f"frozen_ms_spread_{mode}"] = spread(frozen) if frozen else None
        in_rollouts = [f for r in runs if r["mode"] == mode for f in r["frozen_ms"]]  # the balancer's own moves
        out[f"frozen_ms_rollouts_{mode}"] = spread(in_rollouts) if in_rollouts else None
    out["all_runs_same_tokens"] = all(r["same_tokens_as_first_run"] for r in runs) and tiny["migrations"][
        "same_tokens_both_modes"] and (large is None or large["same_tokens_both_modes"])
    if large:
        for mode in ("two_stage", "stop_copy"):
            frozen = [r["frozen_ms"] for r in large["rows"] if r["mode"] == mode and r["frozen_ms"] is not None]
            out[f"frozen_ms_median_{mode}_large_kv"] = statistics.median(frozen) if frozen else None
            out[f"frozen_ms_spread_{mode}_large_kv"] = spread(frozen) if frozen else None
        out["kv_mb_per_sample_large_kv"] = statistics.median(r["kv_mb"] for r in large["rows"])
    out["targets"] = {
        "speedup_skewed >= 1.3": out["speedup_skewed"] >= 1.3,
        "speedup_round_robin >= 0.97": out["speedup_round_robin"] >= 0.97,
        "tiny two-stage frozen < one decode step": (out["frozen_ms_median_two_stage"] or float("inf"))
        < out["step_ms_median"],
    }
    if large and None not in (out.get("frozen_ms_median_two_stage_large_kv"),
                              out.get("frozen_ms_median_stop_copy_large_kv")):
        out["targets"]["large-KV two-stage frozen < half of stop-and-copy"] = (
            out["frozen_ms_median_two_stage_large_kv"] < 0.5 * out["frozen_ms_median_stop_copy_large_kv"])
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.27
    for k, mode in enumerate(MODES):
        med = [result["makespan_s"][f"{a}/{mode}"] for a in ASSIGNMENTS]
        sp = [result["makespan_spread"][f"{a}/{mode}"] for a in ASSIGNMENTS]
        err = [[m - s["min"] for m, s in zip(med, sp)], [s["max"] - m for m, s in zip(med, sp)]]
        ax.bar([i + (k - 1) * width for i in range(len(ASSIGNMENTS))], med, width, yerr=err, capsize=3, label=mode)
    ax.set_xticks(range(len(ASSIGNMENTS)), ASSIGNMENTS)
    ax.set_ylabel("rollout makespan (s), median, min-max")
    ax.set_title("tiny world, 2 instances x 1 thread")
    ax.legend()
    labels, values = [], []
    for suffix, name in (("", "tiny"), ("_large_kv", "large KV")):
        for mode in ("two_stage", "stop_copy"):
            v = result.get(f"frozen_ms_median_{mode}{suffix}")
            if v is not None:
                labels.append(f"{name}\n{mode}")
                values.append(v)
    bx.bar(labels, values, color=["tab:orange", "tab:green"] * 2)
    bx.axhline(result["step_ms_median"], color="k", ls="--", lw=1, label="tiny decode step (median)")
    bx.set_ylabel("frozen time (ms), median")
    bx.set_title("freeze at source -> first step at destination")
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write (a PNG goes beside it)")
    ap.add_argument("--quick", action="store_true", help="32 prompts x 4, 16 slots, one repeat, 3 large-KV repeats")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per rollout (default 64, quick 32)")
    ap.add_argument("--slots", type=int, default=None, help="max_slots per instance (default 32, quick 16)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per (assignment, mode) (default 3, quick 1)")
    ap.add_argument("--shuffles", type=int, default=3, help="random_chunk shuffles (>= 3)")
    ap.add_argument("--large-repeats", type=int, default=None, help="large-KV migrations per mode (default 6, quick 3)")
    ap.add_argument("--no-large-kv", action="store_true", help="skip the large-KV measurement")
    ap.add_argument("--threshold", default="auto", help="balancer.threshold: auto (default) or live samples")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    global THRESHOLD
    THRESHOLD = args.threshold if args.threshold == "auto" else int(args.threshold)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.shuffles < 3:
        ap.error("--shuffles: at least 3")
    from trainer.loop.ray_setup import init_ray

    t0 = time.time()
    init_ray()
    tiny = run_tiny(args)
    large = None if args.no_large_kv else run_large_kv(args)
    result = summarize(tiny, large)
    result.update({"tiny": tiny, "large_kv": large, "config": {
        "quick": args.quick, "repeats": args.repeats, "seed": args.seed, "wall_s": time.time() - t0,
        "machine": platform.machine(), "cpus": os.cpu_count(), "platform": platform.platform(),
        "load_avg_at_end": os.getloadavg(),
        "notes": "makespan = wall time of fleet.run (split, decode, gather, balancer start/stop). migrations = orders "
                 "that moved something: queued requests (requests_moved, no KV) or running samples (samples_moved, "
                 "with KV; bytes_moved). speedup_* = "
                 "makespan(off) / makespan(two_stage), medians per ordering; random_chunk = median over shuffles. "
                 "frozen_ms = freeze at the source (a step boundary) -> the destination's first step with the sample "
                 "begins (wall clocks of two processes on one host). step_ms = mean engine step per instance per run. "
                 "Mode order rotates per repeat and ordering."}})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    plot(result, out.with_suffix(".png"))
    print(f"\n{'':<14}" + "".join(f"{m:>12}" for m in MODES))
    for a in ASSIGNMENTS:
        print(f"{a:<14}" + "".join(f"{result['makespan_s'][f'{a}/{m}']:>11.2f}s" for m in MODES))
    keys = ["speedup_skewed", "speedup_random_chunk", "speedup_round_robin", "step_ms_median",
            "frozen_ms_median_two_stage", "frozen_ms_median_stop_copy", "frozen_ms_median_two_stage_large_kv",
            "frozen_ms_median_stop_copy_large_kv", "all_runs_same_tokens"]
    for k in keys:
        print(f"{k}: {result.get(k)}")
    print("targets:", json.dumps(result["targets"]))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
