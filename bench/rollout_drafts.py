"""Rollout drafts on a real model: chains looked up in the rollout itself (the sample's prompt and response, its
GRPO group's siblings, earlier epochs' responses to the same prompt), verified alone or in the same tree as a draft
model's (or head's) nodes; tokens per sample-step, wall-clock of the whole rollout, and the check that every row
emits exactly the tokens plain decoding emits.

    python -m bench.rollout_drafts --actor ~/models/smollm2-135m-instruct --draft ~/models/smollm2-head \\
        --prompts ~/data/arith/test.parquet --name smollm2 [--quick]

Workload: `--num-prompts` prompts (chat template applied as the prompt file asks, as `trainer.examples.arith`'s
Verl rows do) x `--samples` samples each (group = prompt), `--max-new-tokens` at temperature 1, all in one engine
of `--slots` slots (a GRPO rollout on one instance). History: one earlier rollout of the same prompts with other
seeds (`--history-samples` per prompt, seeds offset by 10**6), decoded plain, handed in through the driver's
`HistoryStore` (which keeps the newest `history_per_prompt` per prompt, as a run would). Every run builds a new
engine (the suffix index starts empty; the decoders' weights are shared between engines), rows are interleaved over
the repeats with the order rotated, and medians are reported with their min/max. Before the repeats, every row runs
once on a small warm-up (and `adaptive` rows resolve their calibration there: `calibration='auto'`, profiled on
first use and cached, so the profile is never timed).

Rows (those needing a draft are skipped without `--draft`):
- `none`: plain decoding, the wall-clock baseline and the reference tokens;
- `rollout_drafts`: no draft model, strategy none + rollout drafts (every chain found is verified), with history;
- `rollout_drafts_no_history`: the same from siblings and the prompt only;
- `rollout_drafts:adaptive`: no draft model, strategy adaptive + rollout drafts (a chain verified only where the
  step-time calibration says it pays), with history;
- `<draft>:chain:4`: the draft alone; `<draft>:chain:4+rollout_drafts`: its chain and the rollout chain in one tree;
- `<draft>:adaptive`, `<draft>:adaptive+rollout_drafts`: the adaptive strategy (step-time calibration of this
  machine), without and with rollout drafts.

One torch thread by default (`--threads`): on a shared 2-core machine a 2-thread run swings up to 10x with the
other jobs' load, one thread stays within a few percent. `--quick`: 4 prompts x 4 samples, 32 new tokens, 1
repeat."""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

HISTORY_SEED_OFFSET = 10**6
ROWS = ["none", "rollout_drafts", "rollout_drafts_no_history", "rollout_drafts:adaptive", "head:chain:4",
        "head:chain:4+rollout_drafts", "head:adaptive+rollout_drafts", "head:adaptive"]


def row_spec(name: str) -> dict:
    """A row's engine: draft (bool), strategy, rollout drafts (bool), history (bool)."""
    rollout = name.endswith("rollout_drafts") or name == "rollout_drafts_no_history"
    base = name.split("+")[0]
    if base in ("none", "rollout_drafts", "rollout_drafts_no_history"):
        return {"draft": False, "strategy": "none", "rollout": rollout, "history": name == "rollout_drafts"}
    if base == "rollout_drafts:adaptive":
        return {"draft": False, "strategy": "adaptive", "rollout": True, "history": True}
    if not base.startswith("head:"):
        raise ValueError(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
    return {"draft": True, "strategy": base[len("head:"):], "rollout": rollout, "history": rollout}


def seed_of(base: int, prompt: int, sample: int) -> int:
    return base + 1000 * prompt + sample


def rollout(engine, prompts: list[list[int]], samples: int, max_new: int, seed: int, history=None) -> dict:
    """Every prompt x samples (group = prompt index) through the engine to completion; the wall-clock of the whole
    rollout (adds and steps), the engine's stats and rollout summary, and each request's tokens."""
    from drafting import GenRequest, SamplingParams
    from drafting.runtime.steplog import summarize as summarize_steps

    engine.reset_stats()
    engine.step_log.clear()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        hist = history.get(i) if history is not None else None
        for j in range(samples):
            sp = SamplingParams(temperature=1.0, max_new_tokens=max_new, seed=seed_of(seed, i, j))
            engine.add(GenRequest((i, j), list(p), sp, group=i, history=hist))
    done = {}
    want = len(prompts) * samples
    while len(done) < want:
        for o in engine.step():
            done[o.request_id] = o
    wall = time.perf_counter() - t0
    st = engine.stats()
    tokens = sum(len(o.token_ids) for o in done.values())
    log = list(engine.step_log)
    phases = sorted({k for s in log for k, v in s.items() if k.startswith("t_") and isinstance(v, float)})
    steps = summarize_steps(log)
    steps["phase_ms_per_step"] = {k[2:]: 1000.0 * sum(s.get(k, 0.0) for s in log) / max(len(log), 1)
                                  for k in phases}
    return {"wall_s": wall, "loadavg_1min_at_start": load, "step_log": steps, "tokens": tokens, "tokens_per_s": tokens / wall, "steps": st.steps,
            "mean_tokens_per_step": st.mean_tokens_per_step, "mean_accepted": st.mean_accepted,
            "step_ms": st.step_ms, "stops": sum(o.finish_reason == "stop" for o in done.values()),
            "rollout": engine.rollout_summary(),
            "outputs": {rid: list(o.token_ids) for rid, o in done.items()}}


class Rows:
    """Builds each row's engine (a new one per run) over decoders loaded once and shared."""

    def __init__(self, actor: str, draft: str | None, slots: int, max_len: int, eos: int | None, cfg,
                 calibration_budget_s: float | None = None):
        from drafting import SpeculativeEngine
        from drafting.calibrate.first_use import resolve_calibration

        self.Engine, self.slots, self.max_len, self.eos, self.cfg = SpeculativeEngine, slots, max_len, eos, cfg
        # calibration 'auto' (this pair's cached profile, or one made now within the budget) on the row's own engine
        self.calibration = lambda engine: resolve_calibration(engine, "auto", calibration_budget_s)
        base = SpeculativeEngine(actor, draft, strategy="none", max_slots=1, max_len=max_len, eos_token_id=eos)
        self.target, self.draft = base.target, base.draft  # shared: weights loaded once

    def engine(self, name: str):
        s = row_spec(name)
        return self.Engine(self.target, self.draft if s["draft"] else None, strategy=s["strategy"],
                           max_slots=self.slots, max_len=self.max_len, eos_token_id=self.eos, calibration=self.calibration,
                           rollout_drafts=self.cfg if s["rollout"] else None)


def make_history(rows: Rows, prompts, samples: int, max_new: int, seed: int, cfg) -> tuple:
    """An earlier rollout of the same prompts with other seeds, decoded plain, into the driver's HistoryStore."""
    from drafting.spec.suffix import HistoryStore

    t0 = time.perf_counter()
    r = rollout(rows.engine("none"), prompts, samples, max_new, seed + HISTORY_SEED_OFFSET)
    store = HistoryStore(cfg)
    for (i, j), toks in sorted(r["outputs"].items()):
        store.add(i, toks)
    return store, {"samples_per_prompt": samples, "seed_offset": HISTORY_SEED_OFFSET,
                   "kept_per_prompt": cfg.history_per_prompt, "store": store.stats(),
                   "seconds": round(time.perf_counter() - t0, 2), "tokens": r["tokens"]}


def failure(when: str, e: BaseException) -> dict:
    """An engine error as the results record it: when, the error, and the innermost frame."""
    import traceback

    tb = traceback.extract_tb(e.__traceback__)
    root = str(Path(__file__).resolve().parents[1]) + os.sep
    where = f"{tb[-1].filename.removeprefix(root)}:{tb[-1].lineno} {tb[-1].line}" if tb else ""
    return {"when": when, "error": f"{type(e).__name__}: {e}", "where": where,
            "traceback": traceback.format_exception(type(e), e, e.__traceback__)[-6:]}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(name: str, runs: list[dict], base_wall: float | None) -> dict:
    wall = spread([r["wall_s"] for r in runs])
    row = {"row": name, **row_spec(name), "repeats": len(runs),
           "mean_tokens_per_step": statistics.median(r["mean_tokens_per_step"] for r in runs),
           "mean_tokens_per_step_all": [r["mean_tokens_per_step"] for r in runs],
           "mean_accepted": statistics.median(r["mean_accepted"] for r in runs),
           "wall_s": wall, "wall_s_all": [r["wall_s"] for r in runs],
           "tokens_per_s": spread([r["tokens_per_s"] for r in runs]),
           "steps": statistics.median(r["steps"] for r in runs), "step_ms": statistics.median(r["step_ms"] for r in runs),
           "tokens": runs[0]["tokens"], "stops": runs[0]["stops"],
           "identical": all(r["identical"] for r in runs),
           "loadavg_1min_at_start": [r["loadavg_1min_at_start"] for r in runs]}
    logs = [r["step_log"] for r in runs]
    row["step_log"] = {k: statistics.median(x[k] for x in logs) for k in logs[0]
                       if isinstance(logs[0][k], (int, float))}
    row["step_log"]["phase_ms_per_step"] = {k: statistics.median(x["phase_ms_per_step"].get(k, 0.0) for x in logs)
                                            for k in logs[0]["phase_ms_per_step"]}
    if base_wall:
        row["speedup_vs_none"] = base_wall / wall["median"]
    if runs[0]["rollout"]:
        keys = runs[0]["rollout"].keys()
        row["rollout_summary"] = {k: statistics.median(r["rollout"][k] for r in runs) for k in keys
                                  if isinstance(runs[0]["rollout"][k], (int, float))}
        row["rollout_summary"].update({k: v for k, v in runs[0]["rollout"].items()
                                       if not isinstance(v, (int, float))})
    return row


def targets(rows: dict) -> list[dict]:
    """The brief's three targets, measured (None where a row is missing)."""
    out = []

    def add(what, value, goal, met):
        out.append({"target": what, "measured": value, "goal": goal, "met": met})

    h, hr = rows.get("head:chain:4"), rows.get("head:chain:4+rollout_drafts")
    if h and hr:
        ratio = hr["mean_tokens_per_step"] / h["mean_tokens_per_step"]
        add("tokens/step, head chain:4 + rollout drafts over head chain:4 alone", round(ratio, 4), ">= 1.1",
            ratio >= 1.1)
    rd, none = rows.get("rollout_drafts"), rows.get("none")
    if rd:
        add("tokens/step, rollout drafts alone", round(rd["mean_tokens_per_step"], 4), ">= 1.25",
            rd["mean_tokens_per_step"] >= 1.25)
    # wall-clock under adaptive (the brief's rule: rows that verify a chain every step measure the drafts, not speed;
    # on a CPU a 7-token verify costs several plain steps)
    rda = rows.get("rollout_drafts:adaptive")
    if rda and none:
        ratio = rda["wall_s"]["median"] / none["wall_s"]["median"]
        add("wall-clock, rollout drafts alone (adaptive) over none (median)", round(ratio, 4), "<= 1.0", ratio <= 1.0)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["row"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    tps = [r["mean_tokens_per_step"] for r in rows]
    colors = ["tab:gray" if not r["rollout"] else "tab:green" for r in rows]
    a.bar(range(len(rows)), tps, color=colors)
    for k, v in enumerate(tps):
        a.text(k, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    a.axhline(1.0, color="k", lw=0.5)
    a.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    a.set_ylabel("emitted tokens per sample-step")
    a.set_title("tokens/step (green: with rollout drafts)")
    med = [r["wall_s"]["median"] for r in rows]
    lo = [m - r["wall_s"]["min"] for m, r in zip(med, rows)]
    hi = [r["wall_s"]["max"] - m for m, r in zip(med, rows)]
    b.bar(range(len(rows)), med, yerr=[lo, hi], color=colors, capsize=3)
    for k, v in enumerate(med):
        b.text(k, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    b.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    b.set_ylabel("seconds (median, min-max)")
    w = result["workload"]
    b.set_title(f"wall-clock of the rollout ({w['prompts']}x{w['samples']}, {w['max_new_tokens']} tokens)")
    fig.suptitle(f"rollout drafts, {result['name']}: {result['machine']['cpu_count']} CPUs, "
                 f"{result['machine']['torch_threads']} torch threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def git_commit() -> str | None:
    """HEAD, with '+dirty:<sha1 of the diff>' when the engine's sources (drafting/) differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()

    try:
        diff = git("diff", "HEAD", "--", "drafting") + git("status", "--porcelain", "--", "drafting")
        return git("rev-parse", "HEAD") + (f"+dirty:{hashlib.sha1(diff.encode()).hexdigest()[:12]}" if diff else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--actor", required=True, help="HF directory of the actor (the target)")
    p.add_argument("--draft", default=None, help="draft model or EAGLE-style head directory (the head:* rows)")
    p.add_argument("--prompts", required=True, help="Verl/OpenRLHF prompt file (JSONL or Parquet)")
    p.add_argument("--name", default=None, help="results name (default: the actor directory's name)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (a GRPO group)")
    p.add_argument("--history-samples", type=int, default=8, help="earlier rollout's samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slots", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine, 2 threads swing 10x with other jobs' load)")
    p.add_argument("--calibration-budget-s", type=float, default=None,
                   help="adaptive rows: the first-use profile's budget (None: the device's default, 0: full grid)")
    p.add_argument("--quick", action="store_true", help="4 prompts x 4 samples, 32 new tokens, 1 repeat")
    p.add_argument("--out-dir", default="bench/results")
    a = p.parse_args(argv)
    if a.quick:
        a.num_prompts, a.samples, a.history_samples, a.max_new_tokens, a.repeats = 4, 4, 4, 32, 1
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    from drafting.policy.calibration import cache_dir
    from drafting.spec.suffix import SuffixConfig
    from trainer.loop.data import load_prompts

    names = [r.strip() for r in a.rows.split(",") if r.strip()]
    for n in names:
        row_spec(n)
    if a.draft is None:
        names = [n for n in names if not row_spec(n)["draft"]]
    if "none" not in names:
        names.insert(0, "none")  # the reference tokens and the wall-clock baseline
    name = (a.name or Path(a.actor).expanduser().name) + ("_quick" if a.quick else "")
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = AutoTokenizer.from_pretrained(os.path.expanduser(a.actor))
    prompts = [list(x.token_ids) for x in load_prompts(os.path.expanduser(a.prompts), tok, 256, size=a.num_prompts)]
    max_len = max(map(len, prompts)) + a.max_new_tokens + 1
    cfg = SuffixConfig()
    commit = git_commit()  # the engine these figures are of (others may edit the tree while this runs)
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    rows = Rows(os.path.expanduser(a.actor), a.draft and os.path.expanduser(a.draft), a.slots, max_len, None, cfg,
                a.calibration_budget_s)
    print(f"{len(prompts)} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens) x {a.samples} "
          f"samples, {a.max_new_tokens} new tokens; rows: {', '.join(names)}", flush=True)

    history, history_info = make_history(rows, prompts, a.history_samples, a.max_new_tokens, a.seed, cfg)
    print(f"history: {history_info}", flush=True)

    # warm-up: every row once on a small rollout of other seeds (adaptive rows resolve their calibration here)
    warm, failed = {}, {}
    for n in names:
        t0 = time.perf_counter()
        try:
            eng = rows.engine(n)
            rollout(eng, prompts[:2], 2, min(16, a.max_new_tokens), a.seed + 7 * HISTORY_SEED_OFFSET,
                    history if row_spec(n)["history"] else None)
        except Exception as e:  # noqa: BLE001 (an engine error drops the row, recorded, and the others go on)
            failed[n] = failure("warm-up", e)
            print(f"warm-up {n}: FAILED {failed[n]['error']}", flush=True)
            continue
        warm[n] = {"seconds": round(time.perf_counter() - t0, 2)}
        cal = eng.calibration
        if cal is not None:
            warm[n]["calibration_step_cv_error"] = cal.step_cv_error
            warm[n]["calibration_saturation_live"] = cal.saturation_live
        print(f"warm-up {n}: {warm[n]} (engine build included)", flush=True)
        del eng

    runs = {n: [] for n in names}
    reference = None
    for rep in range(a.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for n in order:
            if n in failed:
                continue
            try:
                eng = rows.engine(n)
                r = rollout(eng, prompts, a.samples, a.max_new_tokens, a.seed,
                            history if row_spec(n)["history"] else None)
            except Exception as e:  # noqa: BLE001
                failed[n] = failure(f"repeat {rep}", e)
                print(f"[{rep}] {n}: FAILED {failed[n]['error']}", flush=True)
                continue
            finally:
                eng = None
                gc.collect()
            if reference is None and n == "none":
                reference = r["outputs"]
            runs[n].append(r)
            print(f"[{rep}] {n}: {r['mean_tokens_per_step']:.3f} tokens/step, {r['wall_s']:.2f} s, "
                  f"{r['tokens_per_s']:.1f} tokens/s, steps {r['steps']}"
                  + (f", chain {r['rollout']['chain_tokens_per_step']:.3f}/step, lookup "
                     f"{r['rollout']['lookup_ms_per_step']:.2f} ms/step" if r["rollout"] else ""), flush=True)
    if "none" in failed:
        raise RuntimeError(f"plain decoding failed: {failed['none']}")
    names = [n for n in names if runs[n]]  # (a row that failed in a later repeat keeps its earlier runs)
    # seeded sampling is lossless: every run of every row emits what plain decoding emitted
    reference = reference or runs["none"][0]["outputs"]
    mismatches = []
    for n in names:
        for k, r in enumerate(runs[n]):
            bad = [rid for rid, toks in reference.items() if r["outputs"].get(rid) != toks]
            r["identical"] = not bad and len(r["outputs"]) == len(reference)
            if bad:
                mismatches.append({"row": n, "repeat": k, "requests": [list(b) for b in bad[:8]], "count": len(bad)})
    base_wall = statistics.median(r["wall_s"] for r in runs["none"])
    table = [summarize(n, runs[n], base_wall) for n in names]
    by_name = {r["row"]: r for r in table}
    draft_info = None
    if a.draft:
        dj = Path(os.path.expanduser(a.draft)) / "distill.json"
        if dj.is_file():
            d = json.loads(dj.read_text())
            draft_info = {k: d[k] for k in d if not isinstance(d[k], (list, dict))}
    result = {
        "name": name, "args": vars(a), "commit": commit,
        "workload": {"prompts": len(prompts), "samples": a.samples, "max_new_tokens": a.max_new_tokens,
                     "temperature": 1.0, "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
                     "slots": a.slots, "max_len": max_len, "seed": a.seed},
        "rollout_drafts_config": vars(cfg), "history": history_info, "draft": a.draft, "draft_distill": draft_info,
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "loadavg_start": load0, "loadavg_end": os.getloadavg()},
        "calibration_dir": str(cache_dir()), "warmup": warm, "seconds": round(time.perf_counter() - t_start, 1),
        "rows": table, "failed": failed, "targets": targets(by_name), "identical": not mismatches, "mismatches": mismatches}
    path = out_dir / f"rollout_drafts_{name}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    plot(result, out_dir / f"rollout_drafts_{name}.png")
    print(f"\n{'row':32s} {'tok/step':>8s} {'wall med':>9s} {'min':>7s} {'max':>7s} {'tok/s':>7s} {'x none':>7s} "
          f"{'chain/step':>10s} identical")
    for r in table:
        rs = r.get("rollout_summary", {})
        print(f"{r['row']:32s} {r['mean_tokens_per_step']:8.3f} {r['wall_s']['median']:9.2f} {r['wall_s']['min']:7.2f} "
              f"{r['wall_s']['max']:7.2f} {r['tokens_per_s']['median']:7.1f} {r.get('speedup_vs_none', 0):7.3f} "
              f"{rs.get('chain_tokens_per_step', float('nan')):10.3f} {r['identical']}")
    for n, f in failed.items():
        print(f"{n}: FAILED in {f['when']}: {f['error']} at {f['where']}")
    for t in result["targets"]:
        print(f"target: {t['target']}: {t['measured']} (goal {t['goal']}): {'met' if t['met'] else 'MISSED'}")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    assert not mismatches, f"rows emitted other tokens than plain decoding: {mismatches}"
    return result


if __name__ == "__main__":
    main()
