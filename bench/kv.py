"""Paged against dense K/V at equal memory (issue 26): how many samples a long-tailed rollout keeps live, in how
many steps it finishes; and what a GRPO group's shared prompt saves in prefill and in K/V.

    python -m bench.kv --out bench/results/kv.json [--quick]

Capacity (`runs`): a long-tailed workload (lengths, in new tokens, from a seeded lognormal, sigma 1, whose mean is
at most a quarter of max_len, capped so that prompt + length <= max_len; prompts of 16-32 random tokens) at max_len
1024 (384 requests, mean 0.24 x max_len) and 4096 (256 requests, mean 0.12 x max_len: reduced so that the full run
takes ~15 minutes on a 2-core CPU; see WORKLOADS), on a random-weight model of the tiny world's actor shape (its
config.json, positions raised to max_len + 64, weights from torch seed 0), strategy `none` (plain decoding, no
draft). The dense engine has 32 slots; the paged engine 256 slots and a pool of the bytes those 32 dense rows
allocate (32 x dense.tcache.columns x position_bytes), so both kinds of a max_len get the same `kv_bytes`. Each run
adds every request, then steps the engine until nothing is live or queued, recording per step the live samples, the
pool's blocks in use, the tokens and the wall time. Both kinds must emit the same tokens (position-keyed sampling,
fp32): checked and reported.

EOS suppressed: the engines are built with `eos_token_id=[]` (an explicit empty stop list: `eos_tensor` makes it an
empty tensor, and `torch.isin` against it never stops a sample), so each request runs to its own
`SamplingParams.max_new_tokens`. No token id is forbidden and no logit is touched: the model samples freely.

The `adaptive` row is not run: it needs a draft (a random-weight one of the tiny draft's shape: its acceptance says
nothing about a trained pair) and a first-use calibration profile of that pair, and one more run of the 4096
workload costs about as much as the two kinds together. Left out on purpose; see the JSON's notes.

Prompt sharing (`sharing`): GRPO rollouts of n = 4 samples per prompt on the paged engine with `share_prompts`
on and off, the same seeds: `tiny` (the tiny world's first 16 eval prompts, as bench.rollout takes them: 5-34
tokens once tokenized, not the issue's 20-70; its actor and draft, `chain:2`, its EOS, 65 new tokens at most) and
`prompt512` (512-token random prompts on the random-weight model, `none`, 64 new tokens). Prefill
tokens are `stats().prefill_tokens` after the rollout; prompt K/V bytes are the pool's blocks in use right after
admission (`engine.admit()`, before any step) x block x position_bytes. The tokens of both runs must match.

One torch thread, one process. Timings are single runs (a repeat of the 4096 workload costs minutes); the machine's
load average is recorded, as other work may share its cores."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from drafting.records import GenRequest, SamplingParams
from drafting.runtime.engine import Engine, position_bytes
from drafting.spec.sampling import derive_seed

DENSE_SLOTS, PAGED_SLOTS = 32, 256
GROUP = 4
SIGMA = 1.0  # the lognormal's shape: a heavy tail (its 99th percentile is 10x the median, 6x the mean)
# max_len -> (requests, the length distribution's mean as a share of max_len). 1024: the quarter (0.24, so
# that the capped sample's mean stays under it), with more requests than the paged engine's slots so that the pool
# runs dry and preempts. 4096: reduced for this 2-core CPU (a mean of a quarter, ~250k tokens per kind, is ~45 min
# for the two kinds by step times measured here; the paged CPU gather's cost grows as live samples x longest
# context): 256 requests of mean 0.12 x max_len. `--requests` / `--mean-fraction` override both.
WORKLOADS = {1024: (384, 0.24), 4096: (256, 0.12)}
QUICK_WORKLOADS = {1024: (144, 0.24)}  # quick: still more requests than 4 x 32, so the target stays checkable
SERIES_POINTS = 400  # per-step series kept in the JSON (every k-th step)


# ---- models and workloads -----------------------------------------------------------------------------------
def tiny_config():
    """The tiny world's actor config (LlamaConfig from its config.json)."""
    from transformers import LlamaConfig

    from trainer.tiny.bootstrap import ensure_tiny_world

    return LlamaConfig.from_pretrained(ensure_tiny_world().actor_path)


def random_model(config, max_len: int, seed: int = 0):
    """A random-weight LlamaForCausalLM of `config`'s shape, its positions raised to fit max_len (+ 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_dict(config.to_dict())
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, max_len + 64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def workload(n: int, max_len: int, vocab: int, seed: int, mean_fraction: float, prompt_range=(16, 32),
             sigma: float = SIGMA) -> tuple[list[list[int]], list[int]]:
    """n random prompts (token ids 3..vocab-1, lengths in prompt_range) and their lengths in new tokens: lognormal
    with mean mean_fraction x max_len, rounded, at least 1, capped at max_len - prompt."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, int(rng.integers(prompt_range[0], prompt_range[1] + 1))).tolist()
               for _ in range(n)]
    mu = np.log(mean_fraction * max_len) - sigma ** 2 / 2
    lengths = [int(min(max(1, round(x)), max_len - len(p))) for x, p in zip(rng.lognormal(mu, sigma, n), prompts)]
    return prompts, lengths


def kv_bytes_of(engine: Engine) -> int:
    """What the engine's K/V takes: a dense engine's rows (slots x columns x bytes a position), a paged one's pool."""
    per = position_bytes(engine.target, engine.draft, engine.head, engine.dtype)
    if engine.pool is None:
        return engine.max_slots * engine.tcache.columns * per
    return engine.pool.blocks * engine.pool.block * per


# ---- capacity -----------------------------------------------------------------------------------------------
def run_capacity(model, max_len: int, cache: str, prompts, lengths, seed: int, kv_bytes: int | None = None,
                 dense_slots: int = DENSE_SLOTS, paged_slots: int = PAGED_SLOTS) -> dict:
    """One run of the workload to completion on one cache kind (kv_bytes: the paged pool's; the dense engine's is
    its rows'). Returns its row, per-step series and outputs (token ids by request)."""
    engine = Engine(model, None, strategy="none", max_slots=dense_slots if cache == "dense" else paged_slots,
                    max_len=max_len, eos_token_id=[], kv_cache=cache,
                    kv_bytes=kv_bytes if cache == "paged" else None)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        engine.add(GenRequest(i, list(p), SamplingParams(temperature=1.0, max_new_tokens=n,
                                                         seed=derive_seed(seed, i))))
    live, used, toks, secs, queued, resumed = [], [], [], [], [], []
    outputs, before = {}, engine.stats()
    t0 = time.perf_counter()
    while engine.live or engine.queue:
        t, logged = time.perf_counter(), len(engine.step_log)
        finished = engine.step()
        secs.append(time.perf_counter() - t)
        st = engine.stats()
        live.append(engine.step_log[-1]["live"] if len(engine.step_log) > logged else 0)
        used.append(st.kv_blocks_used)
        toks.append(st.tokens - before.tokens)
        queued.append(st.queued)
        resumed.append(st.resumed - before.resumed)
        before = st
        outputs.update((o.request_id, o.token_ids) for o in finished)
    seconds = time.perf_counter() - t0
    st = engine.stats()
    assert len(outputs) == len(prompts) and all(len(outputs[i]) == n for i, n in enumerate(lengths)), \
        f"{cache} {max_len}: a request did not run to its length"
    prompt_prefill = sum(len(p) - 1 for p in prompts)
    admit_s = [s.get("t_admit", 0.0) for s in engine.step_log]
    row = {"max_len": max_len, "cache": cache, "kv_bytes": kv_bytes if cache == "paged" else kv_bytes_of(engine),
           "peak_live": max(live),
           "steps": len(live), "tokens": sum(toks), "tokens_per_s": sum(toks) / seconds,
           "preemptions": st.preemptions,
           # beyond the fields
           "requests": len(prompts), "max_slots": engine.max_slots, "seconds": round(seconds, 2),
           "mean_live": statistics.fmean(live), "step_ms": 1000 * seconds / len(live), "resumed": st.resumed,
           "recomputed_tokens": st.prefill_tokens - prompt_prefill, "kv_block": st.kv_block,
           "kv_blocks": st.kv_blocks, "kv_blocks_peak": st.kv_blocks_peak, "pool_bytes": kv_bytes_of(engine),
           "resume_admit_s": round(sum(a for a, r in zip(admit_s, resumed) if r), 3)}
    series = {"live": live, "kv_blocks_used": used, "tokens": toks, "step_s": secs, "queued": queued,
              "resumed": resumed}
    return {"row": row, "series": series, "outputs": outputs}


def capacity(config, max_len: int, requests: int, mean_fraction: float, seed: int, log=print,
             dense_slots: int = DENSE_SLOTS, paged_slots: int = PAGED_SLOTS) -> tuple[list[dict], dict]:
    """The dense and paged runs of one max_len, at the dense cache's bytes. Returns their rows and series."""
    model = random_model(config, max_len, seed)
    prompts, lengths = workload(requests, max_len, config.vocab_size, seed, mean_fraction)
    mean_len = statistics.fmean(lengths)
    assert mean_len <= max_len / 4, f"mean length {mean_len} over a quarter of {max_len}"
    dense = run_capacity(model, max_len, "dense", prompts, lengths, seed, dense_slots=dense_slots)
    log(dense["row"])
    paged = run_capacity(model, max_len, "paged", prompts, lengths, seed, kv_bytes=dense["row"]["kv_bytes"],
                         paged_slots=paged_slots)
    log(paged["row"])
    same = dense["outputs"] == paged["outputs"]
    workload_info = {"requests": requests, "mean_length": mean_len, "median_length": statistics.median(lengths),
                     "max_length": max(lengths), "mean_prompt": statistics.fmean(len(p) for p in prompts),
                     "length_distribution": f"lognormal(sigma={SIGMA}, mean={mean_fraction} x max_len), "
                                            f"rounded, >= 1, capped at max_len - prompt"}
    rows = []
    for run in (dense, paged):
        rows.append({**run["row"], "mean_length": mean_len, "tokens_match_dense": same})
    return rows, {"workload": workload_info, "dense": dense["series"], "paged": paged["series"]}


# ---- prompt sharing -----------------------------------------------------------------------------------------
def run_group_rollout(target, draft, strategy: str, prompts, group: int, max_new: int, max_len: int, eos,
                      share: bool, seed: int) -> dict:
    """GRPO rollout: `group` samples of each prompt on a paged engine, prompt sharing on or off; the prompt K/V
    right after admission, the prefill tokens, the outputs."""
    engine = Engine(target, draft, strategy=strategy, max_slots=len(prompts) * group, max_len=max_len,
                    eos_token_id=eos, kv_cache="paged", share_prompts=share)
    per = position_bytes(engine.target, engine.draft, engine.head, engine.dtype)
    for g, p in enumerate(prompts):
        for j in range(group):
            i = g * group + j
            engine.add(GenRequest(i, list(p), SamplingParams(temperature=1.0, max_new_tokens=max_new,
                                                             seed=derive_seed(seed, i))))
    t0 = time.perf_counter()
    engine.admit()
    st = engine.stats()
    assert st.live == len(prompts) * group, "every sample is admitted at once"
    prompt_blocks, prefill_at_admit = st.kv_blocks_used, st.prefill_tokens
    outputs = {}
    while engine.live or engine.queue:
        outputs.update((o.request_id, o.token_ids) for o in engine.step())
    seconds = time.perf_counter() - t0
    st = engine.stats()
    return {"prompt_blocks": prompt_blocks, "prompt_kv_bytes": prompt_blocks * st.kv_block * per,
            "prefill_tokens": st.prefill_tokens, "prefill_at_admit": prefill_at_admit,
            "shared_tokens": st.shared_tokens, "block": st.kv_block, "position_bytes": per, "seconds": seconds,
            "tokens": sum(len(t) for t in outputs.values()), "outputs": outputs}


def sharing_row(workload: str, target, draft, strategy: str, prompts, max_new: int, eos, seed: int,
                group: int = GROUP) -> dict:
    max_len = max(len(p) for p in prompts) + max_new + 1
    on = run_group_rollout(target, draft, strategy, prompts, group, max_new, max_len, eos, True, seed)
    off = run_group_rollout(target, draft, strategy, prompts, group, max_new, max_len, eos, False, seed)
    assert on["outputs"] == off["outputs"], f"{workload}: shared prompts changed the tokens"
    samples = len(prompts) * group
    return {"workload": workload, "group_size": group, "block": on["block"],
            "prompt_tokens_mean": statistics.fmean(len(p) for p in prompts),
            "prefill_tokens_shared": on["prefill_tokens"], "prefill_tokens_unshared": off["prefill_tokens"],
            "prompt_kv_bytes_shared": on["prompt_kv_bytes"], "prompt_kv_bytes_unshared": off["prompt_kv_bytes"],
            # beyond the fields
            "prompt_tokens_min": min(len(p) for p in prompts), "prompt_tokens_max": max(len(p) for p in prompts),
            "prompts": len(prompts), "samples": samples, "strategy": strategy, "max_new_tokens": max_new,
            "shared_tokens": on["shared_tokens"], "prompt_blocks_shared": on["prompt_blocks"],
            "prompt_blocks_unshared": off["prompt_blocks"], "position_bytes": on["position_bytes"],
            "tokens": on["tokens"], "tokens_identical": True,
            "rollout_s_shared": round(on["seconds"], 3), "rollout_s_unshared": round(off["seconds"], 3)}


def tiny_prompts(n: int) -> tuple[list[list[int]], object, object, int]:
    """The tiny world's first n eval prompts (tokenized as bench.rollout does), its actor, its draft and EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.tiny import task
    from trainer.tiny.bootstrap import ensure_tiny_world

    w = ensure_tiny_world()
    tok = AutoTokenizer.from_pretrained(w.tokenizer_path)
    actor = AutoModelForCausalLM.from_pretrained(w.actor_path, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(w.draft_path, dtype=torch.float32).eval()
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.convert_tokens_to_ids("<eos>")
    rows = task.read_prompts_jsonl(w.eval_prompts)[:n]
    return [tok(r["prompt"])["input_ids"] for r in rows], actor, draft, eos


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, length).tolist() for _ in range(n)]


# ---- targets, plot, table -------------------------------------------------------------------------------------
def capacity_targets(rows: list[dict]) -> dict:
    out = {}
    for max_len in sorted({r["max_len"] for r in rows}):
        d, p = (next(r for r in rows if r["max_len"] == max_len and r["cache"] == c) for c in ("dense", "paged"))
        out[str(max_len)] = {"peak_live_ratio": p["peak_live"] / d["peak_live"],
                             "peak_live_4x": p["peak_live"] >= 4 * d["peak_live"],
                             "fewer_steps": p["steps"] < d["steps"], "steps_ratio": d["steps"] / p["steps"],
                             "tokens_per_s_ratio": p["tokens_per_s"] / d["tokens_per_s"],
                             "mean_live_ratio": p["mean_live"] / d["mean_live"],
                             "same_kv_bytes": p["kv_bytes"] == d["kv_bytes"] and p["pool_bytes"] <= d["kv_bytes"],
                             "preemptions_reported": "preemptions" in p, "tokens_match": p["tokens_match_dense"]}
    return out


def sharing_targets(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        n, samples = r["group_size"], r["samples"]
        out[r["workload"]] = {
            "prefill_one_nth": r["prefill_tokens_shared"] * n == r["prefill_tokens_unshared"],
            "prefill_ratio": r["prefill_tokens_shared"] / r["prefill_tokens_unshared"],
            "kv_within_bound": r["prompt_kv_bytes_shared"] <= r["prompt_kv_bytes_unshared"] / n
            + samples * r["block"] * r["position_bytes"],
            "kv_ratio": r["prompt_kv_bytes_shared"] / r["prompt_kv_bytes_unshared"],
            "tokens_identical": r["tokens_identical"]}
    return out


def thin(series: dict, points: int = SERIES_POINTS) -> dict:
    steps = len(series["live"])
    k = max(1, -(-steps // points))
    idx = list(range(0, steps, k)) + ([steps - 1] if (steps - 1) % k else [])
    return {"every": k, "step": idx, **{name: [round(v[i], 5) if isinstance(v[i], float) else v[i] for i in idx]
                                       for name, v in series.items()}}


def plot(series: dict, rows: list[dict], path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lens = sorted(series, key=int)
    fig, axes = plt.subplots(2, len(lens), figsize=(6 * len(lens), 6.5), squeeze=False)
    for c, max_len in enumerate(lens):
        s = series[max_len]
        ax = axes[0, c]
        for kind, color in (("dense", "tab:gray"), ("paged", "tab:blue")):
            ax.plot(range(1, len(s[kind]["live"]) + 1), s[kind]["live"], color=color, lw=1, label=f"{kind}")
        ax.set_title(f"max_len {max_len}: live samples ({s['workload']['requests']} requests, "
                     f"mean length {s['workload']['mean_length']:.0f})", fontsize=9)
        ax.set_ylabel("live samples")
        ax.legend(fontsize=8)
        ax = axes[1, c]
        p = next(r for r in rows if r["max_len"] == int(max_len) and r["cache"] == "paged")
        ax.plot(range(1, len(s["paged"]["kv_blocks_used"]) + 1), s["paged"]["kv_blocks_used"], color="tab:blue",
                lw=1, label="paged: blocks in use")
        ax.axhline(p["kv_blocks"], color="tab:red", lw=0.8, ls="--", label=f"pool ({p['kv_blocks']} blocks)")
        ax.set_xlabel("step")
        ax.set_ylabel(f"blocks of {p['kv_block']} positions")
        ax.set_title(f"paged pool: {p['preemptions']} preemptions", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def print_tables(result: dict) -> None:
    def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
        """cols: (key, heading, format): a header line, then one line per row."""
        print("\n" + " ".join(f"{head:>10}" for _, head, _ in cols))
        for r in rows:
            print(" ".join(f"{format(r[key], fmt):>10}" for key, _, fmt in cols))

    table([{**r, "kv_mib": r["kv_bytes"] / 2**20} for r in result["runs"]],
          [("max_len", "max_len", "d"), ("cache", "cache", "s"), ("kv_mib", "kv MiB", ".1f"),
           ("peak_live", "peak live", "d"), ("mean_live", "mean live", ".1f"), ("steps", "steps", "d"),
           ("tokens", "tokens", "d"), ("tokens_per_s", "tok/s", ".0f"), ("preemptions", "preempt", "d"),
           ("resumed", "resumed", "d"), ("recomputed_tokens", "recomp", "d"), ("seconds", "s", ".1f")])
    for max_len, t in result.get("capacity_targets", {}).items():
        print(f"max_len {max_len}: peak live x{t['peak_live_ratio']:.1f} (>= 4: {t['peak_live_4x']}), "
              f"steps dense/paged {t['steps_ratio']:.2f} (fewer: {t['fewer_steps']}), "
              f"tok/s paged/dense {t['tokens_per_s_ratio']:.2f}, tokens match: {t['tokens_match']}")
    table([{**r, "kv_sh": r["prompt_kv_bytes_shared"] / 1024, "kv_unsh": r["prompt_kv_bytes_unshared"] / 1024}
           for r in result["sharing"]],
          [("workload", "workload", "s"), ("group_size", "n", "d"), ("prompt_tokens_mean", "prompt", ".1f"),
           ("prefill_tokens_shared", "prefill sh", "d"), ("prefill_tokens_unshared", "unsh", "d"),
           ("kv_sh", "KV KiB sh", ".0f"), ("kv_unsh", "unsh", ".0f")])
    for w, t in result.get("sharing_targets", {}).items():
        print(f"{w}: prefill x{t['prefill_ratio']:.3f} (1/n: {t['prefill_one_nth']}), prompt K/V "
              f"x{t['kv_ratio']:.3f} (<= 1/n + a block a sample: {t['kv_within_bound']})")


def git_commit() -> str | None:
    """HEAD, with '+dirty' when the engine's sources differ from it."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()

    try:
        head, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--", "../drafting")
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


# ---- main -----------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write (kv.png beside it, named after it)")
    ap.add_argument("--quick", action="store_true", help=f"max_len 1024 only, {QUICK_WORKLOADS[1024][0]} requests, "
                                                         f"fewer prompts to share")
    ap.add_argument("--requests", type=int, default=None, help=f"capacity requests at every max_len (default "
                                                               f"{ {k: v[0] for k, v in WORKLOADS.items()} })")
    ap.add_argument("--mean-fraction", type=float, default=None,
                    help=f"mean length / max_len (at most 0.25; default { {k: v[1] for k, v in WORKLOADS.items()} })")
    ap.add_argument("--max-lens", default=None, help="comma-separated (default 1024,4096; quick 1024)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: capacity, sharing")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    skip = set(filter(None, args.skip.split(",")))
    table = QUICK_WORKLOADS if args.quick else WORKLOADS
    max_lens = [int(x) for x in args.max_lens.split(",")] if args.max_lens else list(table)
    plan = {m: (args.requests or table.get(m, WORKLOADS.get(m, (256, 0.24)))[0],
                args.mean_fraction or table.get(m, WORKLOADS.get(m, (256, 0.24)))[1]) for m in max_lens}
    out = Path(args.out)
    result = {"runs": [], "sharing": [], "config": {
        "threads": torch.get_num_threads(), "quick": args.quick, "seed": args.seed,
        "seeds": {"model": args.seed, "workload": args.seed, "sampling": f"derive_seed({args.seed}, request index)",
                  "prompt512": args.seed + 1},
        "torch": torch.__version__, "commit": git_commit(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "platform": platform.platform(), "loadavg_start": os.getloadavg(),
        "capacity": {"workloads": {str(m): {"requests": r, "mean_fraction": f} for m, (r, f) in plan.items()},
                     "sigma": SIGMA, "dense_slots": DENSE_SLOTS,
                     "paged_slots": PAGED_SLOTS, "strategy": "none", "temperature": 1.0, "dtype": "float32",
                     "eos": "eos_token_id=[] (no stop token: each request runs to its max_new_tokens)",
                     "model": "random LlamaForCausalLM of the tiny actor's config, torch seed = seed, "
                              "max_position_embeddings = max_len + 64"},
        "notes": "kv_bytes: dense = 32 x tcache.columns x position_bytes; the paged pool gets the same bytes "
                 "(its blocks = bytes // position_bytes // block). peak_live: the most samples a step ran; "
                 "mean_live: mean over steps. tokens_per_s: tokens / wall seconds of the stepping loop (one run). "
                 "recomputed_tokens: prefill tokens beyond the prompts' (preempted samples recomputed, not "
                 "swapped). resume_admit_s: admission time of the steps that resumed preempted samples. pool_bytes: "
                 "the paged pool's whole blocks within kv_bytes. No adaptive "
                 "row: it needs a draft and a calibration of a random-weight pair, and one more 4096 run."}}
    t0 = time.perf_counter()
    series = {}

    def log(r: dict) -> None:
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)

    if "capacity" not in skip:
        config = tiny_config()
        for max_len, (requests, fraction) in plan.items():
            rows, s = capacity(config, max_len, requests, fraction, args.seed, log)
            result["runs"] += rows
            series[str(max_len)] = s
        result["capacity_targets"] = capacity_targets(result["runs"])
        result["workloads"] = {k: v["workload"] for k, v in series.items()}
        result["series"] = {k: {kind: thin(v[kind]) for kind in ("dense", "paged")} for k, v in series.items()}
        result["plot"] = plot(series, result["runs"], out.with_name(out.stem + ".png"))
    if "sharing" not in skip:
        prompts, actor, draft, eos = tiny_prompts(8 if args.quick else 16)
        result["sharing"].append(sharing_row("tiny", actor, draft, "chain:2", prompts, 65, eos, args.seed))
        log(result["sharing"][-1])
        config = tiny_config()
        model = random_model(config, 512 + 64 + 1, args.seed)
        prompts = random_prompts(4 if args.quick else 8, 512, config.vocab_size, args.seed + 1)
        result["sharing"].append(sharing_row("prompt512", model, None, "none", prompts, 64, [], args.seed))
        log(result["sharing"][-1])
        result["sharing_targets"] = sharing_targets(result["sharing"])
    result["config"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print_tables(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} ({result['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
