"""Rollout throughput on the tiny world: fixed draft strategies, the adaptive one, plain decoding and HF
`generate`, in the phases a rollout passes through; plus the sampling schemes and the cost of their noise.

    python -m bench.rollout --out bench/results/rollout.json [--quick]

Phases: `rollout` is an RLHF-sized rollout (64 prompts x 4 samples, 64 slots: the batch is full while the
queue lasts, then drains through the long tail); `live=B` keeps B long samples decoding (prompts of 48+
digits, answers as long). One torch thread, one process, the same seeds for every configuration; the
configurations of a phase are interleaved over the repeats, and medians are reported with their min/max.
Every engine first runs one rollout on other prompts (its warm-up; the adaptive strategy learns there, as it
would have in earlier RLHF iterations). The oracle of a phase is its best fixed strategy. `adaptive:device` is
the GPU path's adaptive (each step's shape from earlier steps, no reads inside a step) run here on the CPU,
against `adaptive`, the CPU's (per-level decisions from the tree's scores): what the GPU's way costs."""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from drafting import GenRequest, SamplingParams, SpeculativeEngine
from drafting.runtime.engine import per_prompt
from drafting.runtime.steplog import summarize
from drafting.spec.suffix import SuffixConfig

FIXED = ["chain:2", "chain:4", "tree:3,2,6", "tree:4,2,10", "tree:6,3,24"]
QUICK_FIXED = ["chain:2", "tree:3,2,6"]
# rollout drafts (`drafting.spec.suffix`): chains from the prompt, the group's siblings and an earlier rollout of the
# same prompts (other seeds): alone (no draft model, a chain of up to 6 every step), beside the model's chain in one
# tree every step, and under adaptive
ROLLOUT_ROWS = {"rollout_drafts": ("none", False), "chain:4+rollout_drafts": ("chain:4", True),
                "adaptive+rollout_drafts": ("adaptive", True)}
PHASES = ["rollout", "live=64", "live=16", "live=4", "live=1"]
SCHEME_STRATEGIES = ["chain:1", "chain:2", "chain:4", "tree:3,2,6", "tree:4,2,10"]
QUICK_SCHEME_STRATEGIES = ["chain:2", "tree:3,2,6"]
SCHEMES = ["gumbel", "inverse_cdf", "residual"]
NOISE_VOCABS = (32000, 152064)


def load_world():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.tiny.bootstrap import ensure_tiny_world

    w = ensure_tiny_world()
    tok = AutoTokenizer.from_pretrained(w.tokenizer_path)
    actor = AutoModelForCausalLM.from_pretrained(w.actor_path, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(w.draft_path, dtype=torch.float32).eval()
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.convert_tokens_to_ids("<eos>")
    return w, tok, actor, draft, eos


def phase_prompts(phase: str, tok, w, quick: bool, offset: int = 0) -> list[list[int]]:
    """Token ids of a phase's requests. offset > 0: other prompts of the same kind (the warm-up's)."""
    from trainer.tiny import task

    if phase == "rollout":
        n = 16 if quick else 64
        rows = task.read_prompts_jsonl(w.eval_prompts)[offset:offset + n]
        return [tok(r["prompt"])["input_ids"] for r in rows for _ in range(4)]
    live = int(phase.split("=")[1])
    rng = random.Random(1000 + live + offset)
    count = live if live > 1 else 3  # live=1: a few long samples one after another
    prompts = []
    for _ in range(count):
        digits = [rng.choice(task.DIGITS) for _ in range(rng.randint(48, task.MAX_LEN))]
        prompts.append(tok(task.make_prompt(digits))["input_ids"])
    return prompts


def slots_of(phase: str) -> int:
    return 64 if phase == "rollout" else int(phase.split("=")[1])


def run_engine(engine: SpeculativeEngine, prompts, temperature: float, max_new: int, seed: int,
               groups: list | None = None, history: dict | None = None) -> dict:
    """One rollout of `prompts` (the same per-prompt seeds as `engine.generate`); with `groups`, each request names
    its group (and brings `history[group]`), as the fleet's requests do when rollout drafts are on."""
    engine.reset_stats()
    engine.step_log.clear()
    t0 = time.perf_counter()
    sp = SamplingParams(temperature=temperature, max_new_tokens=max_new, seed=seed)
    if groups is None:
        outs = engine.generate(prompts, sp)
    else:
        outs = generate_grouped(engine, prompts, per_prompt(sp, len(prompts)), groups, history or {})
    dt = time.perf_counter() - t0
    st = engine.stats()
    tokens = sum(len(o.token_ids) for o in outs)
    drafted = sum(o.stats["drafted"] for o in outs)
    accepted = sum(o.stats["accepted"] for o in outs)
    out = {"seconds": dt, "tokens_per_s": tokens / dt, "mean_accepted": st.mean_accepted, "steps": st.steps,
           "mean_tokens_per_step": st.mean_tokens_per_step,
           "acceptance_rate": accepted / drafted if drafted else 0.0, "tokens": tokens,
           "outputs": [tuple(o.token_ids) for o in outs], "log": list(engine.step_log)}
    if engine.rollout is not None:  # (reset_stats zeroed its counts: this run's)
        out["rollout"] = engine.rollout_summary()
    return out


def generate_grouped(engine, prompts, params, groups, history) -> list:
    """engine.generate with request groups and their history."""
    ids = [("bench", i) for i in range(len(prompts))]
    for rid, p, sp, g in zip(ids, prompts, params, groups):
        engine.add(GenRequest(rid, list(p), sp, group=g, history=history.get(g)))
    done = {}
    while len(done) < len(ids):
        done.update((o.request_id, o) for o in engine.step())
    return [done[i] for i in ids]


def groups_of(phase: str, n: int) -> list[int]:
    """The rollout phase's prompts come in groups of 4 samples; a live=B phase's prompts are all different."""
    return [i // 4 for i in range(n)] if phase == "rollout" else list(range(n))


def run_hf(actor, prompts, temperature: float, max_new: int, eos: int, pad: int, seed: int, chunk: int = 64):
    """HF generate, left-padded batches of `chunk` prompts (the engine's slot count), same sampling."""
    torch.manual_seed(seed)
    tokens, t0 = 0, time.perf_counter()
    for i in range(0, len(prompts), chunk):
        part = prompts[i:i + chunk]
        T = max(len(p) for p in part)
        ids = torch.full((len(part), T), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for b, p in enumerate(part):
            ids[b, T - len(p):], attn[b, T - len(p):] = torch.tensor(p), 1
        with torch.inference_mode():
            out = actor.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=temperature,
                                 top_k=0, top_p=1.0, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad)
        for row in out[:, T:].tolist():
            tokens += row.index(eos) + 1 if eos in row else len(row)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens_per_s": tokens / dt, "mean_accepted": 0.0, "steps": 0, "tokens": tokens,
            "acceptance_rate": 0.0}


def median_row(runs: list[dict], **fields) -> dict:
    tps = [r["tokens_per_s"] for r in runs]
    row = dict(fields)
    row.update({"tokens_per_s": statistics.median(tps), "tokens_per_s_min": min(tps), "tokens_per_s_max": max(tps),
                "mean_accepted": statistics.median(r["mean_accepted"] for r in runs),
                "mean_tokens_per_step": statistics.median(r.get("mean_tokens_per_step", 0.0) for r in runs),
                "acceptance_rate": statistics.median(r["acceptance_rate"] for r in runs),
                "steps": statistics.median(r["steps"] for r in runs), "tokens": runs[0]["tokens"],
                "seconds": statistics.median(r["seconds"] for r in runs),
                "repeats": len(runs)})
    return row


def earlier_rollout(actor, prompts, phase, max_len, eos, temperature, max_new, seed) -> dict:
    """History for rollout drafts: an earlier rollout of the same prompts with other seeds, its responses by group
    (the rollout phase only: a live=B phase's prompts never come back)."""
    if phase != "rollout":
        return {}
    e = SpeculativeEngine(actor, None, strategy="none", max_slots=64, max_len=max_len, eos_token_id=eos)
    outs = e.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=max_new, seed=seed + 7919))
    history: dict = {}
    for g, o in zip(groups_of(phase, len(prompts)), outs):
        history.setdefault(g, []).append(list(o.token_ids))
    return history


def bench_phases(world, strategies, temperature, repeats, quick, calibration, seed, log, kinds=("paged",),
                 rollout_rows=()) -> tuple[list, dict]:
    """Every phase, its strategies (on each K/V cache kind) interleaved over the repeats; returns rows and the
    adaptive engines' logs (of the first kind)."""
    w, tok, actor, draft, eos = world
    max_new = 65  # the longest answer (64 digits) + <eos>
    rows, adaptive_logs = [], {}
    for phase in PHASES:
        prompts, warm = phase_prompts(phase, tok, w, quick), phase_prompts(phase, tok, w, quick, offset=64)
        max_len = max(len(p) for p in prompts + warm) + max_new + 1
        engines, grouped = {}, {}
        history = earlier_rollout(actor, prompts, phase, max_len, eos, temperature, max_new, seed)
        for kind in kinds:
            extra = [n for n in ["chain:4"] + list(rollout_rows) if n not in strategies]  # (quick: rollout phase)
            for name in strategies + (extra if phase == "rollout" or not quick else []):
                strategy, _, mode = name.partition(":device")  # adaptive:device = the GPU path's adaptive on CPU
                strategy, with_draft = ROLLOUT_ROWS.get(name, (strategy, strategy != "none"))
                engines[name, kind] = SpeculativeEngine(
                    actor, draft if with_draft else None, strategy=strategy, max_slots=slots_of(phase),
                    max_len=max_len, eos_token_id=eos, calibration=calibration,
                    adaptive_mode="device" if name.endswith(":device") else "auto", kv_cache=kind,
                    rollout_drafts=SuffixConfig() if name in ROLLOUT_ROWS else None)
                if name in ROLLOUT_ROWS:  # requests in groups, with the earlier rollout's responses as history
                    grouped[name, kind] = {"groups": groups_of(phase, len(prompts)), "history": history}
                run_engine(engines[name, kind], warm, temperature, max_new, seed + 1,  # warm-up; adaptive learns
                           groups=groups_of(phase, len(warm)) if name in ROLLOUT_ROWS else None)
        runs = {key: [] for key in engines}
        if phase == "rollout":
            runs["hf_generate", kinds[0]] = []
        for _ in range(repeats):
            for name, kind in runs:
                if name == "hf_generate":
                    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
                    runs[name, kind].append(run_hf(actor, prompts, temperature, max_new, eos, pad, seed))
                else:
                    runs[name, kind].append(run_engine(engines[name, kind], prompts, temperature, max_new, seed,
                                                       **grouped.get((name, kind), {})))
        reference = runs["none", kinds[0]][0]["outputs"]
        for (name, kind), rs in runs.items():
            if name != "hf_generate":
                assert all(r["outputs"] == reference for r in rs), f"{phase} {name}: tokens differ from plain decoding"
            row = median_row(rs, phase=phase, name=name, temperature=temperature, scheme="gumbel", kv_cache=kind)
            if name in ROLLOUT_ROWS:
                row["history"] = bool(history)
                row["rollout"] = {k: statistics.median(r["rollout"][k] for r in rs) for k in rs[0]["rollout"]
                                  if isinstance(rs[0]["rollout"][k], (int, float))}
            if name != "hf_generate":
                row["selection_overhead_frac"] = statistics.median(summarize(r["log"])["selection_overhead_frac"]
                                                                   for r in rs)
            rows.append(row)
            log(row)
        for kind in kinds:
            fixed = [r for r in rows if r["phase"] == phase and r["name"] in FIXED + QUICK_FIXED
                     and r["kv_cache"] == kind]
            if fixed:  # (none with --only)
                best = max(fixed, key=lambda r: r["tokens_per_s"])
                rows.append({**best, "name": "oracle", "oracle_of": best["name"]})
        if ("adaptive", kinds[0]) in engines:
            adaptive_logs[phase] = {"log": runs["adaptive", kinds[0]][-1]["log"],
                                    "predictor": engines["adaptive", kinds[0]].strategy.predictor.calibration()}
    return rows, adaptive_logs


def bench_schemes(world, strategies, repeats, quick, seed, log) -> list:
    """Acceptance and speed of the three exact sampling schemes on the rollout phase, at temperature 1.0 and 0.7.
    The residual scheme's tokens depend on the strategy; the other two's do not."""
    from bench.schemes import use_scheme

    w, tok, actor, draft, eos = world
    prompts = phase_prompts("rollout", tok, w, quick)
    max_len = max(len(p) for p in prompts) + 66
    rows = []
    for temperature in (1.0, 0.7):
        engines = {}
        for name in strategies:
            for scheme in SCHEMES:
                e = SpeculativeEngine(actor, draft, strategy=name, max_slots=64, max_len=max_len, eos_token_id=eos)
                use_scheme(e, scheme)
                run_engine(e, prompts[:8], temperature, 8, seed + 1)
                engines[(name, scheme)] = e
        runs = {k: [] for k in engines}
        for _ in range(repeats):
            for k, e in engines.items():
                runs[k].append(run_engine(e, prompts, temperature, 65, seed))
        for (name, scheme), rs in runs.items():
            row = median_row(rs, phase="rollout", name=name, temperature=temperature, scheme=scheme)
            rows.append(row)
            log(row)
    return rows


def noise_cost(vocabs, steps: int, seed: int) -> dict:
    """Milliseconds per step spent generating position-keyed noise (two-level, as the engine does, and
    single-level for comparison) against the step's time, at several vocabulary sizes: random models with the
    tiny world's shapes, 16 live samples, tree:3,2,6, temperature 1."""
    import drafting.spec.noise as noise

    real_gumbel = noise.gumbel
    spent = [0.0]

    def timed_gumbel(*a, **k):
        t = time.perf_counter()
        out = real_gumbel(*a, **k)
        spent[0] += time.perf_counter() - t
        return out

    out = {}
    for V in vocabs:
        actor, draft = random_pair(V)
        gen = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(0, V, (32,), generator=gen).tolist() for _ in range(16)]
        entry = {}
        for label in ("two_level", "single_level"):
            eng = SpeculativeEngine(actor, draft, strategy="tree:3,2,6", max_slots=16, max_len=128)
            if label == "single_level":
                eng.stages.block = V
            for i, p in enumerate(prompts):
                eng.add(GenRequest(i, p, SamplingParams(temperature=1.0, max_new_tokens=64, seed=seed + i)))
            eng.step()  # admission + a first step
            noise.gumbel, spent[0] = timed_gumbel, 0.0
            t0 = time.perf_counter()
            try:
                for _ in range(steps):
                    eng.step()
            finally:
                noise.gumbel = real_gumbel
            step_ms = 1000 * (time.perf_counter() - t0) / steps
            entry[label] = {"noise_ms": 1000 * spent[0] / steps, "step_ms": step_ms,
                            "share": spent[0] / steps / (step_ms / 1000)}
        out[str(V)] = entry
    return out


def random_pair(V: int):
    """Untrained models of the tiny world's shapes with a vocabulary of V: flat distributions, the worst case
    for near-ties."""
    from trainer.tiny import models as tm
    from trainer.tiny.bootstrap import RECIPE

    mk = lambda r, s: tm.build_causal_lm(tm.llama_config(V, r["layers"], r["hidden"], r["heads"],  # noqa: E731
                                                          r["kv_heads"], r["intermediate"], 256), s).eval()
    return mk(RECIPE["actor"], 0), mk(RECIPE["draft"], 1)


def flip_rate(actor, draft, prompts, eos, dtype: torch.dtype, seed: int, max_new: int = 65) -> dict:
    """Where position-keyed sampling stops being bitwise identical: in bfloat16 the logits of one sample differ
    with the batch shape and the verify width, and a token flips where two perturbed scores tie within that
    rounding. Compared with plain decoding of the whole batch: each strategy, and batches of one. Flip rate =
    samples that diverge / tokens compared up to the divergence (a flip changes everything after it)."""
    sp = [SamplingParams(temperature=1.0, max_new_tokens=max_new, seed=seed + i) for i in range(len(prompts))]
    max_len = max(len(p) for p in prompts) + max_new + 1

    def outputs(strategy, slots):
        e = SpeculativeEngine(actor, None if strategy == "none" else draft, strategy=strategy, max_slots=slots,
                              max_len=max_len, eos_token_id=eos, dtype=dtype)
        if slots == 1:
            return [e.generate([p], [q])[0].token_ids for p, q in zip(prompts, sp)]
        return [o.token_ids for o in e.generate(prompts, sp)]

    ref = outputs("none", len(prompts))
    out = {}
    for name, strategy, slots in (("chain:2", "chain:2", len(prompts)), ("tree:3,2,6", "tree:3,2,6", len(prompts)),
                                  ("none, batch of 1", "none", 1)):
        flips = compared = 0
        for a, b in zip(outputs(strategy, slots), ref):
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            flips += n is not None or len(a) != len(b)
            compared += min(len(a), len(b)) if n is None else n + 1
        out[name] = {"samples": len(ref), "diverged": flips, "tokens": compared, "flips_per_token": flips / compared}
    return out


def flip_rates(world, quick: bool, seed: int) -> dict:
    """float32 and bfloat16 on the tiny world, and bfloat16 on untrained models with a 32k vocabulary."""
    w, tok, actor, draft, eos = world
    prompts = phase_prompts("rollout", tok, w, quick)[::4]  # one sample per prompt
    out = {f"tiny/{dt}": flip_rate(actor, draft, prompts, eos, getattr(torch, dt), seed)
           for dt in ("float32", "bfloat16")}
    big_actor, big_draft = random_pair(32000)
    gen = torch.Generator().manual_seed(seed)
    rand_prompts = [torch.randint(0, 32000, (16,), generator=gen).tolist() for _ in range(8 if quick else 16)]
    for dt in ("float32", "bfloat16"):
        out[f"random_32k/{dt}"] = flip_rate(big_actor, big_draft, rand_prompts, None, getattr(torch, dt), seed,
                                            max_new=16 if quick else 32)
    return out


def plot(adaptive_logs: dict, path: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    log = adaptive_logs.get("rollout", {}).get("log")
    if log:
        fig, ax = plt.subplots(figsize=(9, 4))
        steps = range(len(log))
        ax.plot(steps, [s["live"] for s in log], color="tab:gray", label="live samples")
        ax.set_xlabel("step of the rollout")
        ax.set_ylabel("live samples")
        ax2 = ax.twinx()
        ax2.plot(steps, [s["nodes"] / s["live"] for s in log], color="tab:blue", label="verified nodes per sample")
        ax2.plot(steps, [s["levels"] for s in log], color="tab:orange", lw=0.8, label="draft levels")
        ax2.scatter([i for i, s in enumerate(log) if s["plain"]], [0] * sum(s["plain"] for s in log), marker="|",
                    color="tab:red", label="plain step")
        ax2.set_ylabel("nodes per sample / levels")
        fig.legend(loc="upper center", ncol=4, fontsize=8)
        fig.tight_layout()
        out = path.with_name(path.stem + "_adaptive_nodes.png")
        fig.savefig(out, dpi=120)
        plt.close(fig)
        written.append(str(out))
    bins = adaptive_logs.get("rollout", {}).get("predictor", {}).get("bins")
    if bins:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([0, 1], [0, 1], color="tab:gray", lw=0.8)
        ax.scatter([b["predicted"] for b in bins], [b["observed"] for b in bins],
                   s=[max(10, 200 * b["count"] / max(x["count"] for x in bins)) for b in bins])
        ax.set_xlabel("predicted acceptance")
        ax.set_ylabel("observed acceptance")
        ax.set_title("acceptance predictor (prequential)")
        fig.tight_layout()
        out = path.with_name(path.stem + "_predictor.png")
        fig.savefig(out, dpi=120)
        plt.close(fig)
        written.append(str(out))
    return written


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write (PNGs beside it)")
    ap.add_argument("--quick", action="store_true", help="every phase, fewer strategies, prompts and repeats")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3, quick 1)")
    ap.add_argument("--calibration", default="auto", help="calibration file for adaptive (default: auto)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: phases, schemes, flips, noise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated rows to run of the phases (none always runs: "
                    "the reference), e.g. none,adaptive,adaptive+rollout_drafts")
    ap.add_argument("--kv-cache", default="paged", help="K/V cache kinds to run, comma-separated: paged, dense "
                                                         "(the first one's rows give the ratios)")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.kv_cache.split(",") if k.strip()]
    torch.set_num_threads(1)
    repeats = args.repeats or (1 if args.quick else 3)
    skip = set(filter(None, args.skip.split(",")))
    world = load_world()
    fixed = QUICK_FIXED if args.quick else FIXED
    print(f"{'phase':<9}{'name':<14}{'scheme':<12}{'temp':>5}{'tok/s':>9}{'[min':>8}{'max]':>8}{'acc/step':>9}"
          f"{'acc rate':>9}")

    def log(r):
        name = r["name"] + ("" if r.get("kv_cache", kinds[0]) == kinds[0] else "@" + r["kv_cache"])
        print(f"{r['phase']:<9}{name:<14}{r.get('scheme', ''):<12}{r['temperature']:>5}{r['tokens_per_s']:>9.1f}"
              f"{r['tokens_per_s_min']:>8.1f}{r['tokens_per_s_max']:>8.1f}{r['mean_accepted']:>9.2f}"
              f"{r['acceptance_rate']:>9.3f}", flush=True)

    result = {"rows": [], "config": {
        "threads": 1, "repeats": repeats, "quick": args.quick, "seed": args.seed, "torch": torch.__version__,
        "machine": platform.machine(), "cpus": os.cpu_count(), "platform": platform.platform(),
        "phases": {"rollout": "64 eval prompts x 4 samples (quick: 16 x 4), 64 slots",
                   "live=B": "B prompts of 48-64 digits (live=1: 3 in turn), B slots"},
        "notes": "tokens_per_s = generated tokens (incl. EOS) / wall seconds of engine.generate; medians over "
                 "interleaved repeats with min/max; mean_accepted = accepted draft tokens per sample-step; "
                 "acceptance_rate = accepted / verified draft tokens; oracle = the phase's best fixed strategy"}}
    t0 = time.perf_counter()
    if "phases" not in skip:
        from drafting.calibrate.first_use import resolve_calibration

        probe = SpeculativeEngine(world[2], world[3], strategy="none", max_slots=64, max_len=160)
        cal = resolve_calibration(probe, args.calibration)
        names, extra = ["none"] + fixed + ["adaptive", "adaptive:device"], list(ROLLOUT_ROWS)
        if args.only:
            keep = {"none"} | set(args.only.split(","))
            names, extra = [n for n in names + extra if n in keep], []
        rows, adaptive_logs = bench_phases(world, names, 1.0, repeats, args.quick, cal, args.seed, log, kinds, extra)
        result["rows"] += rows
        result["step_model_cv_error"] = cal.step_cv_error
        result["step_model"] = {"families": cal.families, "cv_error": cal.cv_error, "file": cal.path}
        result["roofline"] = cal.roofline
        rollout_pred = adaptive_logs.get("rollout", {}).get("predictor", {})
        result["predictor_ece"] = rollout_pred.get("ece")
        result["predictor_calibration"] = rollout_pred
        result["adaptive_by_phase"] = {p: summarize(v["log"]) for p, v in adaptive_logs.items()}
        result["adaptive_rollout_summary"] = result["adaptive_by_phase"].get("rollout", {})  # (--only without adaptive)
        result["selection_overhead_frac"] = result["adaptive_rollout_summary"].get("selection_overhead_frac")
        result["ratios"] = ratios([r for r in result["rows"] if r.get("kv_cache", kinds[0]) == kinds[0]])
        if len(kinds) > 1:
            result["kv_cache_ratios"] = kv_ratios(result["rows"], kinds)
        result["plots"] = plot(adaptive_logs, Path(args.out))
    if "schemes" not in skip:
        strategies = QUICK_SCHEME_STRATEGIES if args.quick else SCHEME_STRATEGIES
        result["scheme_rows"] = bench_schemes(world, strategies, repeats, args.quick, args.seed, log)
    if "flips" not in skip:
        result["flip_rate"] = flip_rates(world, args.quick, args.seed)
        for dt, e in result["flip_rate"].items():
            print(f"{dt}: " + "; ".join(f"{k}: {v['diverged']}/{v['samples']} diverged "
                                        f"({v['flips_per_token']:.2e} per token)" for k, v in e.items()), flush=True)
    if "noise" not in skip:
        vocab = world[2].config.vocab_size
        result["noise_ms_per_step"] = noise_cost((vocab,) + NOISE_VOCABS, 2 if args.quick else 4, args.seed)
        for V, e in result["noise_ms_per_step"].items():
            print(f"noise at V={V}: two-level {e['two_level']['noise_ms']:.2f} ms/step "
                  f"({100 * e['two_level']['share']:.1f}% of a {e['two_level']['step_ms']:.0f} ms step); "
                  f"single-level {e['single_level']['noise_ms']:.2f} ms/step "
                  f"({100 * e['single_level']['share']:.1f}%)", flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    for k, v in result.get("ratios", {}).items():
        print(f"{k}: {v:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['seconds']} s)")
    return result


def kv_ratios(rows: list[dict], kinds: list[str]) -> dict:
    """tokens/s of each later cache kind over the first's, per phase and configuration (interleaved in one run)."""
    by = {(r["phase"], r["name"], r.get("kv_cache")): r["tokens_per_s"] for r in rows}
    return {f"{phase}/{name}/{kind}_over_{kinds[0]}": v / by[phase, name, kinds[0]]
            for (phase, name, kind), v in by.items() if kind in kinds[1:] and (phase, name, kinds[0]) in by}


def ratios(rows: list[dict]) -> dict:
    """The targets' ratios, each within one phase of one run."""
    out = {}
    for phase in PHASES:
        by = {r["name"]: r["tokens_per_s"] for r in rows if r["phase"] == phase}
        if "adaptive" in by and "oracle" in by:
            out[f"{phase}/adaptive_over_best_fixed"] = by["adaptive"] / by["oracle"]
            out[f"{phase}/adaptive_over_none"] = by["adaptive"] / by["none"]
            out[f"{phase}/adaptive_over_best_of_fixed_and_none"] = by["adaptive"] / max(by["oracle"], by["none"])
        out.update(rollout_draft_ratios(phase, {r["name"]: r for r in rows if r["phase"] == phase}))
    return out


def rollout_draft_ratios(phase: str, row: dict) -> dict:
    """Rollout drafts' targets within one phase: tokens per step alone and beside the model's chain, wall-clock
    under adaptive, and the host time of their lookups and index updates against a plain step's."""
    out = {}
    if "adaptive+rollout_drafts" in row and "adaptive" in row:
        out[f"{phase}/adaptive+rollout_drafts_over_adaptive"] = (row["adaptive+rollout_drafts"]["tokens_per_s"]
                                                                 / row["adaptive"]["tokens_per_s"])
    if "chain:4+rollout_drafts" in row and "chain:4" in row:
        out[f"{phase}/chain:4+rollout_drafts_over_chain:4_tokens_per_step"] = (
            row["chain:4+rollout_drafts"]["mean_tokens_per_step"] / row["chain:4"]["mean_tokens_per_step"])
    if "rollout_drafts" in row:
        out[f"{phase}/rollout_drafts_tokens_per_step"] = row["rollout_drafts"]["mean_tokens_per_step"]
        plain_ms = row["none"]["seconds"] * 1000 / max(row["none"]["steps"], 1)
        out[f"{phase}/rollout_drafts_lookup_share_of_plain_step"] = (
            row["rollout_drafts"]["rollout"]["lookup_ms_per_step"] / plain_ms)
    return out


if __name__ == "__main__":
    main()
