"""Paged against dense K/V at equal memory (issue 26): how many samples a long-tailed rollout keeps live, in how
many steps it finishes; and what a GRPO group's shared prompt saves in prefill and in K/V.

    python -m bench.kv --out bench/results/kv.json [--quick] [--skip capacity,sharing]
    python -m bench.kv --out bench/results/kv_blocks.json --blocks 8,16,32,64 --skip capacity,sharing [--quick]

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

Block size (`blocks`, issue: choose `generation.kv_block` by measurement): the capacity workload of max_len 1024
(384 requests: the pool runs dry) on the paged engine at each `--blocks` size, the same pool bytes (32 dense
rows'), 3 repeats (quick: its 144 requests, 2 repeats; the pool does not run dry) interleaved, the order rotated
each repeat, after a discarded warm-up: tok/s (wall and process CPU) median/min/max, steps, peak live, blocks in
use at the peak, internal fragmentation (allocated positions holding no K/V, at the peak and over all steps),
preemptions; every run must emit the first run's tokens (asserted). Then the CPU attention path's cost a decode
step at a long context (`--gather-context` 4096, `--gather-rows` 8, the tiny actor's layers and heads): the
paged cache's index_select gather of scattered blocks, and that plus SDPA, against SDPA over dense views; and a
GRPO group's (4) shared prompt K/V at admission per size (the tiny world's eval prompt lengths, 20-70 and 512
tokens). `choice` in the JSON: which size wins on this CPU and the figures that say why (the GPU's Triton path,
which reads pages in place, is not measured here). Its PNG: the JSON's name .png when capacity is skipped, else
_blocks.png. About 12 minutes on an idle 2-core CPU (16 with other work; quick: 3).

One torch thread, one process. Timings of capacity and sharing are single runs (a repeat of the 4096 workload
costs minutes); the machine's load average is recorded, as other work may share its cores."""
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
# the `blocks` part: block sizes at the capacity workload of BLOCK_MAX_LEN (its requests and mean as above), the
# sizes interleaved over repeats; the gather's micro-measure at a long context
BLOCK_SIZES, BLOCK_REPEATS, QUICK_BLOCK_REPEATS, BLOCK_MAX_LEN = (8, 16, 32, 64), 3, 2, 1024
GATHER_CONTEXT, GATHER_ROWS, GATHER_REPS = 4096, 8, {False: 15, True: 5}
# a run that got less than this share of a core (CPU over wall seconds) was slowed by other work on the machine
CONTENDED_BELOW = 0.9
# the choice: sizes within TIE of the best median CPU-time tok/s are a tie on throughput (repeats of one size spread
# ~3-4% here); of those, the largest whose steps are within STEPS_TIE of the fewest any size takes (capacity nearly
# the best; a larger block costs less per block: the gather's indices, the table's width, a GPU kernel's pages)
TIE, STEPS_TIE = 0.03, 0.03
GPU_NOTE = (" The GPU is unmeasured: there the Triton kernel reads the pages in place through the block table "
            "(no gather), so the CPU's gather cost says nothing about it; its cost per block (one page a program "
            "iteration) and the fragmentation and sharing figures above, which hold on any device, are what a GPU "
            "measurement should weigh.")
BLOCK_NOTES = (
    "Per block size: the paged engine on the capacity workload (random-weight tiny-actor model, strategy none, "
    "no EOS) at the same pool bytes (32 dense rows'; the pool holds their whole blocks: pool_positions); repeats "
    "interleaved (repeat r runs the sizes rotated by r). tokens_per_s: tokens / wall seconds of the stepping loop, "
    "median/min/max over repeats (tokens_per_cpu_s: over the process's CPU seconds, less sensitive to other "
    "work on the machine; single process, one torch thread, on a shared 2-core machine: other work may "
    "run). steps, peak_live, mean_live, preemptions, recomputed_tokens and the blocks series: the first repeat "
    "(the schedule does not depend on timing: every repeat takes the same steps, asserted). blocks_used_peak: "
    "the most blocks in use after a step (pool_in_step_peak: the pool's own peak, inside a step). "
    "fragmentation_at_peak: at the first step with blocks_used_peak, the share of allocated positions (blocks x "
    "block) not holding a live sample's K/V (committed tokens less one a sample: the last token's K/V is written "
    "by the next step); fragmentation_mean: the same over all steps' allocations. tokens_identical: every run "
    "(each size, each repeat) emitted exactly the first run's tokens (asserted). gather: the CPU SDPA path's cost "
    "a decode step (all layers): PagedKVCache.layer gathering each row's blocks (scattered in the pool) by "
    "index_select, and that plus SDPA, against SDPA over dense views; sizes interleaved over repeats. sharing: a "
    "GRPO group's (4 samples) prompt K/V at admission with sharing (measured: the pool's blocks in use after "
    "engine.admit(), equal to shared_prompt_blocks) over without (shared_prompt_blocks(share=False), not run); "
    "prompt_share_in_shared_blocks: the share of the prompts' K/V positions in the full blocks siblings share. "
    "Prefill is once per group at every block size (the partial block is copied, not recomputed).")


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
                 dense_slots: int = DENSE_SLOTS, paged_slots: int = PAGED_SLOTS, kv_block: int = 16) -> dict:
    """One run of the workload to completion on one cache kind (kv_bytes: the paged pool's; the dense engine's is
    its rows'; kv_block: the paged pool's block). Returns its row, per-step series and outputs (token ids by
    request). Series `kv_held`: K/V positions the live samples hold after the step (committed tokens less one a
    sample: its last token's K/V is written by the next step)."""
    engine = Engine(model, None, strategy="none", max_slots=dense_slots if cache == "dense" else paged_slots,
                    max_len=max_len, eos_token_id=[], kv_cache=cache,
                    kv_bytes=kv_bytes if cache == "paged" else None, kv_block=kv_block)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        engine.add(GenRequest(i, list(p), SamplingParams(temperature=1.0, max_new_tokens=n,
                                                         seed=derive_seed(seed, i))))
    live, used, toks, secs, queued, resumed, held = [], [], [], [], [], [], []
    outputs, before = {}, engine.stats()
    t0, c0 = time.perf_counter(), time.process_time()
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
        held.append(st.tokens_held - st.live)
        before = st
        outputs.update((o.request_id, o.token_ids) for o in finished)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
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
           "cpu_seconds": round(cpu_seconds, 2), "tokens_per_cpu_s": sum(toks) / cpu_seconds,
           "mean_live": statistics.fmean(live), "step_ms": 1000 * seconds / len(live), "resumed": st.resumed,
           "recomputed_tokens": st.prefill_tokens - prompt_prefill, "kv_block": st.kv_block,
           "kv_blocks": st.kv_blocks, "kv_blocks_peak": st.kv_blocks_peak, "pool_bytes": kv_bytes_of(engine),
           "resume_admit_s": round(sum(a for a, r in zip(admit_s, resumed) if r), 3)}
    series = {"live": live, "kv_blocks_used": used, "tokens": toks, "step_s": secs, "queued": queued,
              "resumed": resumed, "kv_held": held}
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


# ---- block size -----------------------------------------------------------------------------------------------
def internal_fragmentation(blocks_used: int, block: int, kv_held: int) -> float:
    """Share of the allocated positions (blocks_used x block) that hold no token's K/V."""
    allocated = blocks_used * block
    return (allocated - kv_held) / allocated if allocated else 0.0


def row_fragmentation(positions, block: int) -> float:
    """The same share for rows holding `positions` each in their own blocks (no sharing): each row's last block
    is partly empty, sum(ceil(n / block) x block - n) over the rows' allocated positions."""
    allocated = sum(-(-n // block) * block for n in positions)
    return (allocated - sum(positions)) / allocated if allocated else 0.0


def shared_prompt_blocks(prompt_len: int, group: int, block: int, share: bool = True) -> int:
    """Blocks a group of `group` samples of one prompt takes at admission (`PagedMemory.share`): each sample its
    own ceil(prompt_len / block) without sharing; with it the first sample that many and each sibling one (its
    copy of the block holding the prompt's last position, whatever the block size); the siblings share the
    (prompt_len - 1) // block full blocks before it."""
    own = -(-prompt_len // block)
    return group * own if not share else own + (group - 1) * (own - (prompt_len - 1) // block)


def spread(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def contended(run: dict, share: float = CONTENDED_BELOW) -> bool:
    """Whether the run got less than `share` of a core while it ran (process CPU seconds over wall seconds, one
    torch thread): other work on the machine took the rest, and its wall tok/s says more about that work."""
    return run["cpu_seconds"] < share * run["seconds"]


def block_throughput(rows: list[dict], runs: list[dict]) -> list[dict]:
    """Each size's throughput over its runs, into its row: wall tok/s over all runs and over the uncontended ones
    (None where every run was contended), tok/s of process CPU time, seconds, step ms."""
    for row in rows:
        mine = [x for x in runs if x["block"] == row["block"]]
        for x in mine:
            x["contended"] = contended(x)
        clean = [x["tokens_per_s"] for x in mine if not x["contended"]]
        row.update({"tokens_per_s": spread([x["tokens_per_s"] for x in mine]),
                    "tokens_per_s_runs": [x["tokens_per_s"] for x in mine],
                    "tokens_per_s_uncontended": {**spread(clean), "runs": len(clean)} if clean else None,
                    "tokens_per_cpu_s": spread([x["tokens_per_cpu_s"] for x in mine]),
                    "tokens_per_cpu_s_runs": [x["tokens_per_cpu_s"] for x in mine],
                    "contended_runs": sum(x["contended"] for x in mine),
                    "seconds": spread([x["seconds"] for x in mine]),
                    "step_ms_median": statistics.median(x["step_ms"] for x in mine)})
    return rows


def block_sizes_capacity(config, max_len: int, requests: int, mean_fraction: float, blocks, repeats: int,
                         seed: int, log=print, dense_slots: int = DENSE_SLOTS, paged_slots: int = PAGED_SLOTS
                         ) -> tuple[list[dict], list[dict], dict]:
    """The capacity workload of one max_len on the paged engine at each block size, at the same pool bytes (the
    dense rows' of `capacity`), repeats interleaved (repeat r runs the sizes in an order rotated by r, so that no
    size always runs first or last). Returns per-size rows (tok/s median, min, max over repeats; the rest from
    the first repeat, as the schedule is deterministic), per-run rows and per-size series of the first repeat."""
    import gc

    model = random_model(config, max_len, seed)
    prompts, lengths = workload(requests, max_len, config.vocab_size, seed, mean_fraction)
    probe = Engine(model, None, strategy="none", max_slots=dense_slots, max_len=max_len, eos_token_id=[],
                   kv_cache="dense")
    kv_bytes, per = kv_bytes_of(probe), position_bytes(probe.target, None, False, probe.dtype)
    del probe
    # warm-up, discarded: the first run in a process pays for the allocator's and the kernels' first touches
    run_capacity(model, max_len, "paged", prompts[:32], [min(n, 64) for n in lengths[:32]], seed,
                 kv_bytes=kv_bytes, paged_slots=paged_slots, kv_block=blocks[0])
    runs, first, reference = [], {}, None
    for r in range(repeats):
        order = list(blocks[r % len(blocks):]) + list(blocks[:r % len(blocks)])
        for b in order:
            gc.collect()
            run = run_capacity(model, max_len, "paged", prompts, lengths, seed, kv_bytes=kv_bytes,
                               paged_slots=paged_slots, kv_block=b)
            if reference is None:
                reference = run["outputs"]
            assert run["outputs"] == reference, f"block {b}, repeat {r}: tokens differ from the first run's"
            row = {"repeat": r, "block": b, **{k: run["row"][k] for k in (
                "tokens_per_s", "tokens_per_cpu_s", "seconds", "cpu_seconds", "steps", "step_ms", "peak_live",
                "preemptions")}, "loadavg_1min": os.getloadavg()[0]}
            runs.append(row)
            log(row)
            if b not in first:
                first[b] = {"row": run["row"], "series": run["series"]}
            else:  # the schedule does not depend on timing: every repeat takes the same steps
                assert run["row"]["steps"] == first[b]["row"]["steps"], f"block {b}: steps differ between repeats"
            del run
    rows, series = [], {}
    for b in blocks:
        row, s = first[b]["row"], first[b]["series"]
        used, held = s["kv_blocks_used"], s["kv_held"]
        at = max(range(len(used)), key=lambda i: (used[i], -i))  # the first step at the most blocks in use
        allocated = sum(u * b for u in used)
        rows.append({
            "block": b, "steps": row["steps"], "peak_live": row["peak_live"], "mean_live": row["mean_live"],
            "blocks_used_peak": used[at], "pool_blocks": row["kv_blocks"], "pool_in_step_peak": row["kv_blocks_peak"],
            "pool_positions": row["kv_blocks"] * b, "pool_bytes": row["pool_bytes"],
            "fragmentation_at_peak": internal_fragmentation(used[at], b, held[at]),
            "wasted_positions_at_peak": used[at] * b - held[at], "live_at_peak": s["live"][at], "peak_step": at + 1,
            "fragmentation_mean": (allocated - sum(held)) / allocated if allocated else 0.0,
            "preemptions": row["preemptions"], "recomputed_tokens": row["recomputed_tokens"],
            "tokens": row["tokens"], "tokens_identical": True})
        series[str(b)] = s
    block_throughput(rows, runs)
    info = {"max_len": max_len, "requests": requests, "mean_fraction": mean_fraction, "repeats": repeats,
            "kv_bytes": kv_bytes, "position_bytes": per, "paged_slots": paged_slots,
            "mean_length": statistics.fmean(lengths), "max_length": max(lengths),
            "mean_prompt": statistics.fmean(len(p) for p in prompts)}
    return rows, runs, {"workload": info, "series": series}


def block_sharing(model, blocks, prompt_sets: dict, group: int, seed: int) -> list[dict]:
    """A GRPO group's prompt K/V at each block size: the pool's blocks in use right after admission
    (`engine.admit()`: every group's prompt prefilled once, its full blocks shared) for each set of prompts,
    against the blocks without sharing (`shared_prompt_blocks(share=False)`; not run: its prefill costs `group`
    times as much). The measured count must match `shared_prompt_blocks`."""
    out = []
    for name, prompts in prompt_sets.items():
        max_len = max(len(p) for p in prompts) + 2
        for b in blocks:
            engine = Engine(model, None, strategy="none", max_slots=len(prompts) * group, max_len=max_len,
                            eos_token_id=[], kv_cache="paged", kv_block=b, share_prompts=True)
            for g, p in enumerate(prompts):
                for j in range(group):
                    engine.add(GenRequest(g * group + j, list(p), SamplingParams(
                        temperature=1.0, max_new_tokens=1, seed=derive_seed(seed, g * group + j))))
            engine.admit()
            st = engine.stats()
            shared = sum(shared_prompt_blocks(len(p), group, b) for p in prompts)
            unshared = sum(shared_prompt_blocks(len(p), group, b, share=False) for p in prompts)
            assert st.live == len(prompts) * group and st.kv_blocks_used == shared, \
                f"{name}, block {b}: {st.kv_blocks_used} blocks in use at admission, {shared} expected"
            kv = sum(len(p) - 1 for p in prompts)  # K/V positions of a prompt written at admission, per group
            covered = sum((len(p) - 1) // b * b for p in prompts)
            out.append({"prompts": name, "block": b, "group_size": group, "groups": len(prompts),
                        "prompt_tokens_mean": statistics.fmean(len(p) for p in prompts),
                        "prompt_blocks_shared": st.kv_blocks_used, "prompt_blocks_unshared": unshared,
                        "prompt_positions_shared": st.kv_blocks_used * b, "prompt_positions_unshared": unshared * b,
                        "kv_ratio": st.kv_blocks_used / unshared,
                        "prompt_share_in_shared_blocks": covered / kv,
                        "prefill_tokens": st.prefill_tokens})
            del engine
    return out


def tiny_prompt_lengths() -> list[int]:
    """Token counts of the tiny world's eval prompts (as bench.rollout tokenizes them)."""
    from transformers import AutoTokenizer

    from trainer.tiny import task
    from trainer.tiny.bootstrap import ensure_tiny_world

    w = ensure_tiny_world()
    tok = AutoTokenizer.from_pretrained(w.tokenizer_path)
    return [len(tok(r["prompt"])["input_ids"]) for r in task.read_prompts_jsonl(w.eval_prompts)]


def share_prompt_sets(vocab: int, seed: int, quick: bool) -> dict:
    """Prompts whose groups share: the tiny world's eval prompts' lengths (random tokens), the issue's 20-70
    tokens, and 512 tokens (random, seeded)."""
    rng = np.random.default_rng(seed + 2)
    n = 8 if quick else 16
    lens = {"tiny": tiny_prompt_lengths()[:n], "20-70": rng.integers(20, 71, n).tolist(),
            "512": [512] * (2 if quick else 4)}
    return {name: [rng.integers(3, vocab, k).tolist() for k in ks] for name, ks in lens.items()}


def gather_cost(blocks, context: int, rows: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                reps: int, seed: int = 0) -> list[dict]:
    """What the CPU path pays a decode step at a long context: `PagedKVCache.layer` (the rows' blocks gathered by
    index_select) for every layer, and SDPA over the gathered K/V (one query a row, every key visible), against
    SDPA over a dense cache's views. The rows' blocks are scattered through the pool (a random permutation, as
    after churn). Sizes interleaved over `reps` repeats; ms per step (all layers): median, min, max."""
    import torch.nn.functional as F

    from drafting.runtime.blocks import BlockPool
    from drafting.runtime.kv_cache import KVCache, PagedKVCache

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, 1, head_dim, generator=g)
    mask = torch.ones(rows, 1, 1, context, dtype=torch.bool)
    gqa = heads != kv_heads
    dense = KVCache(layers, rows, kv_heads, context, head_dim, "cpu", torch.float32)
    dense.k.normal_(generator=g)
    dense.v.normal_(generator=g)
    caches = {}
    for b in blocks:
        nb = -(-context // b)
        pool = BlockPool(rows * nb, b, rows, nb, torch.device("cpu"))
        pool.free = [pool.free[i] for i in torch.randperm(len(pool.free), generator=g).tolist()]
        for r in range(rows):
            assert pool.grow(r, context)
        c = PagedKVCache(layers, kv_heads, context, head_dim, "cpu", torch.float32, 0, 0, pool.table, pool.blocks, b)
        c.k.normal_(generator=g)
        c.v.normal_(generator=g)
        caches[b] = c
    sl = slice(0, rows)

    def gather(c) -> None:
        for li in range(layers):
            c.layer(li, sl, context)

    def attend(c) -> None:
        for li in range(layers):
            F.scaled_dot_product_attention(q, *c.layer(li, sl, context), attn_mask=mask, enable_gqa=gqa)

    names = ["dense", *blocks]
    times = {n: {"gather": [], "step": []} for n in names}
    with torch.inference_mode():
        for c in (dense, *caches.values()):  # warm: first touches, allocator
            attend(c)
        for r in range(reps):
            for n in names[r % len(names):] + names[:r % len(names)]:
                c = dense if n == "dense" else caches[n]
                if n != "dense":
                    t = time.perf_counter()
                    gather(c)
                    times[n]["gather"].append(1000 * (time.perf_counter() - t))
                t = time.perf_counter()
                attend(c)
                times[n]["step"].append(1000 * (time.perf_counter() - t))
    out = []
    for n in names:
        row = {"block": 0 if n == "dense" else n, "cache": "dense" if n == "dense" else "paged",
               "context": context, "rows": rows, "layers": layers,
               "attention_ms": spread(times[n]["step"])}
        if n != "dense":
            row["gather_ms"] = spread(times[n]["gather"])
            row["blocks_per_row"] = -(-context // n)
        out.append(row)
    base = statistics.median(times["dense"]["step"])
    for row in out:
        row["attention_over_dense"] = row["attention_ms"]["median"] / base
    return out


def block_choice(rows: list[dict], gather: list[dict], sharing: list[dict], default: int = 16, tie: float = TIE,
                 steps_tie: float = STEPS_TIE) -> dict:
    """The block size this CPU measurement favours, and a paragraph saying why. Throughput: median tok/s of process
    CPU time (wall tok/s on this shared machine swings with other work; `contended`); sizes within `tie` of the
    best are a tie. Of the tied, the largest whose steps (deterministic: the capacity at equal bytes) are within
    `steps_tie` of the fewest; where no size ties, the fastest."""
    by = {r["block"]: r for r in rows}
    cpu = {b: r["tokens_per_cpu_s"]["median"] for b, r in by.items()}
    fastest = max(cpu, key=cpu.get)
    tied = sorted(b for b in by if cpu[b] >= (1 - tie) * cpu[fastest])
    fewest = min(r["steps"] for r in rows)
    near = [b for b in tied if by[b]["steps"] <= (1 + steps_tie) * fewest]
    block = max(near) if near else fastest
    g = {r["block"]: r for r in gather if r["cache"] == "paged"}
    dense = next((r for r in gather if r["cache"] == "dense"), None)

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    def listing(f) -> str:
        return "/".join(f(b) for b in by)

    def clean(b) -> str:
        u = by[b]["tokens_per_s_uncontended"]
        return f"{u['median']:.0f}" if u else "-"

    runs_n = sum(len(r["tokens_per_s_runs"]) for r in rows)
    text = (f"Block {block} on this CPU. Throughput does not separate the sizes: median tok/s of process CPU time "
            f"({'/'.join(map(str, by))}) {listing(lambda b: format(cpu[b], '.0f'))}: a tie within {pct(tie)} "
            f"of the best ({fastest}) for {', '.join(map(str, tied))}; wall tok/s medians "
            f"{listing(lambda b: format(by[b]['tokens_per_s']['median'], '.0f'))} swing with the other work on "
            f"this shared 2-core machine ({sum(r['contended_runs'] for r in rows)} of {runs_n} runs got under "
            f"{CONTENDED_BELOW:.0%} of a core; the uncontended runs' medians {listing(clean)}). "
            f"What differs is memory, and it is deterministic: at equal pool bytes the peak leaves "
            f"{listing(lambda b: pct(by[b]['fragmentation_at_peak']))} of the allocated positions empty, the pool "
            f"preempts {listing(lambda b: str(by[b]['preemptions']))} times and the workload takes "
            f"{listing(lambda b: str(by[b]['steps']))} steps (every run emits the same tokens). ")
    if g:
        r0 = next(iter(g.values()))
        text += (f"The CPU gather a decode step ({r0['rows']} rows at context {r0['context']}, all layers) costs "
                 f"{listing(lambda b: format(g[b]['gather_ms']['median'], '.1f') if b in g else '-')} ms, "
                 f"{listing(lambda b: format(g[b]['attention_ms']['median'], '.1f') if b in g else '-')} ms with "
                 f"SDPA" + (f" (dense views: {dense['attention_ms']['median']:.1f} ms)" if dense else "") + ". ")
    share = {}
    for r in sharing:
        share.setdefault(r["prompts"], {})[r["block"]] = r
    parts = []
    for name, d in share.items():
        ratios = "/".join(format(d[b]["kv_ratio"], ".2f") if b in d else "-" for b in by)
        parts.append(f"{ratios} for {name} prompts (mean {next(iter(d.values()))['prompt_tokens_mean']:.0f} "
                     f"tokens)")
    if parts:
        text += ("A GRPO group of 4 shares only full prompt blocks: its prompt K/V with sharing over without is "
                 + "; ".join(parts) + ". ")
    why = (f"Of the sizes tied on throughput, {block} is the largest whose steps are within {pct(steps_tie)} of the "
           f"fewest ({fewest}): it keeps nearly all of the smaller blocks' capacity while paying less per block "
           f"(gather indices, table width)" if near else f"{block} is the fastest")
    others = [b for b in tied if b < block]
    if others:
        b0 = min(others)
        why += (f"; {b0} would hold a little more ({by[b0]['steps']} steps against {by[block]['steps']}, "
                f"{by[b0]['preemptions']} preemptions against {by[block]['preemptions']}) and share more of short "
                f"prompts, for no throughput it shows here")
    larger = [b for b in by if b > block]
    if larger:
        why += (f"; {'/'.join(map(str, larger))} lose memory "
                f"({'/'.join(pct(by[b]['fragmentation_at_peak']) for b in larger)} empty at the peak, "
                f"{'/'.join(str(by[b]['steps']) for b in larger)} steps) for no throughput on this CPU")
    text += why + (f". The default is {default}: " + ("keep it." if block == default else f"{block} would replace it.")
                   if default in by else ".")
    return {"block": block, "fastest_cpu": fastest, "tied": tied, "near_fewest_steps": near, "default": default,
            "tie": tie, "steps_tie": steps_tie, "text": text}


def finish_blocks_part(part: dict, out: Path, png_name: str) -> dict:
    """Throughput over the runs, the choice and the PNG of a blocks part (a fresh one or a saved one's)."""
    block_throughput(part["rows"], part["runs"])
    part["choice_detail"] = block_choice(part["rows"], part.get("gather", []), part.get("sharing", []))
    part["choice"] = part["choice_detail"].pop("text") + GPU_NOTE
    part["notes"] = BLOCK_NOTES
    part["plot"] = plot_blocks(part, out.with_name(png_name))
    return part


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


def plot_blocks(part: dict, path: Path) -> str:
    """tok/s (median, min-max), steps and preemptions, fragmentation, positions in use over steps, the gather's
    cost per step, prompt sharing: one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = part["rows"]
    bs = [r["block"] for r in rows]
    x = range(len(bs))
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    ax = axes[0, 0]
    for k, (key, label, color) in enumerate((("tokens_per_s", "wall", "tab:blue"),
                                             ("tokens_per_cpu_s", "process CPU time", "tab:purple"))):
        med = [r[key]["median"] for r in rows]
        err = [[m - r[key]["min"] for m, r in zip(med, rows)], [r[key]["max"] - m for m, r in zip(med, rows)]]
        xs = [i + (k - 0.5) * 0.4 for i in x]
        ax.bar(xs, med, 0.4, yerr=err, capsize=3, color=color, alpha=0.8, label=f"{label} (median, min-max)")
        for xi, r in zip(xs, rows):
            runs = [y for y in part["runs"] if y["block"] == r["block"]]
            for y in runs:
                ax.plot(xi, y[key], "o", ms=3.5, mfc="white" if y.get("contended") else "k", mec="k")
    w = part["workload"]
    ax.set_title(f"tokens/s, runs as dots (hollow: got < {CONTENDED_BELOW:.0%} of a core): max_len {w['max_len']}, "
                 f"{w['requests']} requests, {w['repeats']} repeats", fontsize=8)
    ax.legend(fontsize=7, loc="lower left")
    ax = axes[0, 1]
    ax.bar(x, [r["steps"] for r in rows], color="tab:gray", label="steps")
    ax.set_ylabel("steps")
    ax2 = ax.twinx()
    ax2.plot(x, [r["preemptions"] for r in rows], "o-", color="tab:red", label="preemptions")
    ax2.plot(x, [r["peak_live"] for r in rows], "s-", color="tab:green", label="peak live")
    ax2.set_ylabel("preemptions / peak live")
    ax.set_title("steps to finish (bars), preemptions, peak live samples", fontsize=9)
    ax2.legend(fontsize=8, loc="lower right")
    ax = axes[0, 2]
    ax.bar([i - 0.2 for i in x], [100 * r["fragmentation_at_peak"] for r in rows], 0.4, label="at the peak")
    ax.bar([i + 0.2 for i in x], [100 * r["fragmentation_mean"] for r in rows], 0.4, label="over all steps")
    ax.set_ylabel("% of allocated positions holding no K/V")
    ax.set_title("internal fragmentation", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    for b, s in part["series"].items():
        ax.plot(s["step"], [u * int(b) for u in s["kv_blocks_used"]], lw=1, label=f"block {b}: allocated")
    b0, s0 = next(iter(part["series"].items()))
    ax.plot(s0["step"], s0["kv_held"], "k--", lw=0.8, label=f"K/V held (block {b0})")
    ax.axhline(rows[0]["pool_positions"], color="tab:red", lw=0.6, ls=":", label="pool")
    ax.set_xlabel("step")
    ax.set_ylabel("positions")
    ax.set_title("pool positions allocated over steps", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    gat = [r for r in part.get("gather", []) if r["cache"] == "paged"]
    if gat:
        gx = range(len(gat))
        gm = [r["gather_ms"]["median"] for r in gat]
        am = [r["attention_ms"]["median"] - r["gather_ms"]["median"] for r in gat]
        ax.bar(gx, gm, label="gather (index_select)", color="tab:orange")
        ax.bar(gx, am, bottom=gm, label="SDPA", color="tab:blue")
        ax.set_xticks(list(gx), [str(r["block"]) for r in gat])
        dense = next((r for r in part["gather"] if r["cache"] == "dense"), None)
        if dense:
            ax.axhline(dense["attention_ms"]["median"], color="k", ls="--", lw=0.8, label="dense views: SDPA")
        ax.set_title(f"CPU attention per decode step: {gat[0]['rows']} rows at context {gat[0]['context']}, "
                     f"{gat[0]['layers']} layers (median ms)", fontsize=9)
        ax.set_xlabel("block")
        ax.set_ylim(0, 1.3 * max(r["attention_ms"]["median"] for r in part["gather"]))
        ax.legend(fontsize=8, ncol=3, loc="upper center")
    ax = axes[1, 2]
    sets = list(dict.fromkeys(r["prompts"] for r in part.get("sharing", [])))
    for k, name in enumerate(sets):
        rs = [r for r in part["sharing"] if r["prompts"] == name]
        ax.plot([bs.index(r["block"]) for r in rs], [r["kv_ratio"] for r in rs], "o-",
                label=f"{name} (mean {rs[0]['prompt_tokens_mean']:.0f} tokens)")
    if sets:
        g = part["sharing"][0]["group_size"]
        ax.axhline(1 / g, color="k", ls=":", lw=0.8, label=f"1/{g}")
        ax.set_ylim(0, 1.05)
    ax.set_title("GRPO group prompt K/V: shared / unshared blocks x block", fontsize=9)
    ax.legend(fontsize=8)
    for a in (axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 2]):
        a.set_xticks(list(x), [str(b) for b in bs])
        a.set_xlabel("block (positions)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def print_tables(result: dict) -> None:
    def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
        """cols: (key, heading, format): a header line, then one line per row (nothing without rows)."""
        if not rows:
            return
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
    part = result.get("blocks")
    if part:
        table([{**r, "tps": r["tokens_per_s"]["median"], "tps_min": r["tokens_per_s"]["min"],
                "tps_max": r["tokens_per_s"]["max"], "frag": 100 * r["fragmentation_at_peak"],
                "cpu": r["tokens_per_cpu_s"]["median"], "cpu_min": r["tokens_per_cpu_s"]["min"],
                "cpu_max": r["tokens_per_cpu_s"]["max"],
                "clean": (r["tokens_per_s_uncontended"] or {"median": float("nan")})["median"],
                "frag_mean": 100 * r["fragmentation_mean"]} for r in part["rows"]],
              [("block", "block", "d"), ("tps", "tok/s med", ".0f"), ("tps_min", "min", ".0f"),
               ("tps_max", "max", ".0f"), ("cpu", "cpu tok/s", ".0f"), ("cpu_min", "min", ".0f"),
               ("cpu_max", "max", ".0f"), ("clean", "uncont.", ".0f"), ("contended_runs", "contended", "d"),
               ("steps", "steps", "d"), ("peak_live", "peak live", "d"),
               ("blocks_used_peak", "blk@peak", "d"), ("pool_blocks", "pool blk", "d"),
               ("frag", "frag@pk %", ".2f"), ("frag_mean", "frag avg %", ".2f"), ("preemptions", "preempt", "d"),
               ("recomputed_tokens", "recomp", "d")])
        if part.get("gather"):
            table([{**r, "g": r.get("gather_ms", {}).get("median", 0.0), "a": r["attention_ms"]["median"],
                    "amin": r["attention_ms"]["min"], "amax": r["attention_ms"]["max"]} for r in part["gather"]],
                  [("cache", "cache", "s"), ("block", "block", "d"), ("g", "gather ms", ".1f"),
                   ("a", "step ms", ".1f"), ("amin", "min", ".1f"), ("amax", "max", ".1f"),
                   ("attention_over_dense", "x dense", ".2f")])
        if part.get("sharing"):
            table(part["sharing"], [("prompts", "prompts", "s"), ("block", "block", "d"),
                                    ("prompt_tokens_mean", "prompt", ".1f"),
                                    ("prompt_blocks_shared", "blk shared", "d"),
                                    ("prompt_blocks_unshared", "unshared", "d"), ("kv_ratio", "KV ratio", ".3f"),
                                    ("prompt_share_in_shared_blocks", "in shared", ".3f")])
        print(f"tokens identical across block sizes: {part['tokens_identical']}")
        print(f"choice: {part['choice']}")


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
def blocks_part(args, plan: dict, skip: set, out: Path, log=print) -> dict:
    """The `blocks` part: capacity at each block size, the gather's cost, prompt sharing, the choice; its PNG is
    the JSON's name .png when the capacity part (which takes that name) is skipped, else _blocks.png."""
    blocks = [int(b) for b in args.blocks.split(",")]
    repeats = args.blocks_repeats or (QUICK_BLOCK_REPEATS if args.quick else BLOCK_REPEATS)
    max_len = args.blocks_max_len
    table = QUICK_WORKLOADS if args.quick else WORKLOADS
    requests, fraction = plan.get(max_len) or (args.requests or table.get(max_len, WORKLOADS.get(
        max_len, (256, 0.24)))[0], args.mean_fraction or table.get(max_len, WORKLOADS.get(max_len, (256, 0.24)))[1])
    config = tiny_config()
    t0 = time.perf_counter()
    rows, runs, info = block_sizes_capacity(config, max_len, requests, fraction, blocks, repeats, args.seed, log)
    part = {"rows": rows, "runs": runs, "workload": info["workload"], "tokens_identical": True,
            "capacity_seconds": round(time.perf_counter() - t0, 1)}
    t0 = time.perf_counter()
    part["gather"] = gather_cost(blocks, args.gather_context, args.gather_rows, config.num_hidden_layers,
                                 config.num_attention_heads, config.num_key_value_heads,
                                 getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                                 GATHER_REPS[args.quick], args.seed)
    for r in part["gather"]:
        log(r)
    part["gather_seconds"] = round(time.perf_counter() - t0, 1)
    model = random_model(config, max_len, args.seed)
    part["sharing"] = block_sharing(model, blocks, share_prompt_sets(config.vocab_size, args.seed, args.quick),
                                    GROUP, args.seed)
    part["series"] = {b: thin(s) for b, s in info["series"].items()}
    return finish_blocks_part(part, out, out.stem + (".png" if "capacity" in skip else "_blocks.png"))


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
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: capacity, sharing, blocks")
    ap.add_argument("--blocks", default=None,
                    help=f"block sizes the `blocks` part compares, comma-separated (e.g. "
                         f"{','.join(map(str, BLOCK_SIZES))}); the part runs only when given (~15 min)")
    ap.add_argument("--blocks-repeats", type=int, default=None,
                    help=f"repeats of each block size (default {BLOCK_REPEATS}, quick {QUICK_BLOCK_REPEATS})")
    ap.add_argument("--blocks-max-len", type=int, default=BLOCK_MAX_LEN,
                    help="the capacity workload the blocks part runs (its requests and mean as for capacity)")
    ap.add_argument("--blocks-from", default=None,
                    help="a saved JSON with a blocks part: recompute its throughput summary, choice and PNG from its "
                         "runs (nothing is run) and write them to --out")
    ap.add_argument("--gather-context", type=int, default=GATHER_CONTEXT)
    ap.add_argument("--gather-rows", type=int, default=GATHER_ROWS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    skip = set(filter(None, args.skip.split(",")))
    table = QUICK_WORKLOADS if args.quick else WORKLOADS
    max_lens = [int(x) for x in args.max_lens.split(",")] if args.max_lens else list(table)
    plan = {m: (args.requests or table.get(m, WORKLOADS.get(m, (256, 0.24)))[0],
                args.mean_fraction or table.get(m, WORKLOADS.get(m, (256, 0.24)))[1]) for m in max_lens}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.blocks_from:
        data = json.loads(Path(args.blocks_from).read_text())
        data["blocks"] = finish_blocks_part(data["blocks"], out, out.stem + (
            ".png" if not data.get("runs") else "_blocks.png"))
        data["blocks"]["refinished"] = f"summary, choice and plot recomputed from the saved runs ({args.blocks_from})"
        print_tables(data)
        out.write_text(json.dumps(data, indent=1))
        print(f"wrote {out}")
        return data
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
    if "blocks" not in skip and args.blocks:
        result["blocks"] = blocks_part(args, plan, skip, out, log)
    result["config"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print_tables(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} ({result['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
