"""Recordings that drive `bench.simulate`: the tiny world's draft trees at every position of every sample, each node
marked on the target's path or not.

    python -m bench.sim_record --out bench/results/simulate_trees.npz

Draft trees depend only on a sample's committed prefix (the draft's proposals are keyed by the position's noise,
not by the strategy), and a seeded sample's tokens do not depend on the strategy. So one run that drafts the
largest tree adaptive can grow (8 levels, 2 children, the 4 best nodes of a level expanded) and verifies none of
it commits one token per step and leaves a tree at every position; afterwards, a node is on the target's path
when its token and its ancestors' are the tokens the sample emitted. Any selection of these nodes, under any
strategy, then accepts exactly what the engine would accept. Workloads: `bench.rollout`'s rollout phase and
its live=16/4/1 phases, and `bench.reallocation`'s batch (same prompts, seeds and sampling as those benchmarks)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from drafting.policy.strategy import DraftStrategy

DEPTH, TOPK, WIDTH = 8, 2, 4  # the adaptive policy's defaults: max_depth 8, topk 2, widths up to 4


class TreeRecorder(DraftStrategy):
    """Drafts the full tree every step, keeps it, verifies no node (every step commits one token)."""

    host_decisions = True

    def __init__(self):
        super().__init__("record", DEPTH, TOPK, 0, WIDTH)
        self.engine = None
        self.trees: list[tuple] = []

    def select(self, tree, view):
        e, B = self.engine, view.live
        ids = [e.live[b].request_id for b in range(B)]
        self.trees.append((ids, e.slots.h["n"][:B].copy(), *(t.numpy().copy() for t in
                                                       (tree.tokens, tree.parents, tree.value, tree.q, tree.margin))))
        return torch.zeros(B, tree.size, dtype=torch.bool)


def layout() -> tuple[np.ndarray, np.ndarray]:
    """Depth and sibling rank of each node slot of a recorded tree (the engine's creation order)."""
    depth, rank, newest = [1] * TOPK, list(range(TOPK)), TOPK
    for d in range(2, DEPTH + 1):
        w = min(WIDTH, newest)
        depth += [d] * (w * TOPK)
        rank += list(range(TOPK)) * w
        newest = w * TOPK
    return np.array(depth), np.array(rank)


def on_path(seq: list[int], n: int, tokens: np.ndarray, parents: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Node i is on the target's path when it predicts position n + depth - 1 correctly and its parent is on it."""
    ok = np.zeros(tokens.size, dtype=bool)
    for i in range(tokens.size):
        pos = n + depth[i] - 1
        ok[i] = pos < len(seq) and tokens[i] == seq[pos] and (parents[i] < 0 or ok[parents[i]])
    return ok


def record(engine, requests) -> dict:
    """Run the requests through `engine` (strategy TreeRecorder); per sample: prompt length, response length and
    its trees in position order."""
    rec = engine.strategy
    rec.engine, rec.trees = engine, []
    for r in requests:
        engine.add(r)
    outs = {}
    while len(outs) < len(requests):
        for o in engine.step():
            outs[o.request_id] = o
    depth, _ = layout()
    per = {rid: [] for rid in outs}
    for ids, n, tokens, parents, value, q, margin in rec.trees:
        assert tokens.shape[1] == depth.size, "recorded tree layout differs from layout()"
        for b, rid in enumerate(ids):
            o = outs[rid]
            seq = list(o.prompt_token_ids) + list(o.token_ids)
            per[rid].append((int(n[b]), value[b], q[b], margin[b], parents[b],
                             on_path(seq, int(n[b]), tokens[b], parents[b], depth)))
    samples, rows = [], []
    for r in requests:
        o, trees = outs[r.request_id], sorted(per[r.request_id], key=lambda t: t[0])
        assert len(trees) == len(o.token_ids), f"{r.request_id}: {len(trees)} trees for {len(o.token_ids)} tokens"
        samples.append({"request_id": str(r.request_id), "prompt_len": len(o.prompt_token_ids),
                        "length": len(o.token_ids), "max_new": r.sampling.max_new_tokens,
                        "temperature": r.sampling.temperature, "first_tree": len(rows)})
        rows += trees
    arrays = {k: np.stack([t[i] for t in rows]) for i, k in enumerate(("n", "value", "q", "margin", "parents",
                                                                      "on_path"))}
    return {"samples": samples, **arrays}


def prefill_ratio(engine, prompts: list[list[int]], repeats: int = 5) -> dict:
    """Prefill of a full batch measured against the plain step that follows it, in one process (a ratio survives a
    loaded machine better than milliseconds do): the step-time model has no prefill component."""
    from drafting import GenRequest, SamplingParams

    ratios = []
    for rep in range(repeats):
        for i, p in enumerate(prompts):
            engine.add(GenRequest(("prefill", rep, i), list(p), SamplingParams(max_new_tokens=2, seed=i)))
        t0 = time.perf_counter()
        engine.admit()  # the engine's prefill alone
        t1 = time.perf_counter()
        engine.step()  # one plain step of the whole batch (nothing left to admit)
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
        while engine.live or engine.queue:
            engine.step()
    ratios.sort()
    return {"live": len(prompts), "prompt_tokens": sum(len(p) - 1 for p in prompts),
            "ctx": int(np.mean([len(p) for p in prompts])), "ratio": ratios[len(ratios) // 2], "ratios": ratios}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/simulate_trees.npz")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from bench.reallocation import requests_for, tiny_batch
    from bench.rollout import load_world, phase_prompts
    from drafting import GenRequest, SamplingParams, SpeculativeEngine
    from drafting.spec.sampling import derive_seed

    world = load_world()
    w, tok, actor, draft, eos = world
    t0 = time.time()
    workloads = {}
    # bench.rollout's rollout phase: 64 eval prompts x 4, one SamplingParams(seed=0) per generate call
    prompts = phase_prompts("rollout", tok, w, quick=False)
    reqs = [GenRequest(("rollout", i), list(p), SamplingParams(temperature=1.0, max_new_tokens=65,
                                                              seed=derive_seed(0, i))) for i, p in enumerate(prompts)]
    workloads["rollout"] = (reqs, 64)
    for phase in ("live=16", "live=4", "live=1"):  # the long-sample phases (their prompts do not depend on --quick)
        ps = phase_prompts(phase, tok, w, quick=True)
        workloads[phase] = ([GenRequest((phase, i), list(p), SamplingParams(temperature=1.0, max_new_tokens=65,
                                                                          seed=derive_seed(0, i)))
                             for i, p in enumerate(ps)], max(1, int(phase.split("=")[1])))
    _, rprompts, max_new = tiny_batch(64, 0)
    workloads["reallocation"] = (requests_for(rprompts, list(range(len(rprompts))), max_new, "r"), 32)
    out, meta = {}, {"depth": DEPTH, "topk": TOPK, "width": WIDTH, "workloads": {}}
    for name, (reqs, slots) in workloads.items():
        max_len = max(len(r.prompt_token_ids) for r in reqs) + 66 + DEPTH
        engine = SpeculativeEngine(actor, draft, strategy=TreeRecorder(), max_slots=slots, max_len=max_len,
                                   eos_token_id=eos)
        rec = record(engine, reqs)
        base = sum(len(v) for k, v in out.items() if k.endswith("/n"))
        for s in rec["samples"]:
            s["first_tree"] += base
        meta["workloads"][name] = {"samples": rec["samples"], "max_slots": slots}
        for k in ("n", "value", "q", "margin", "parents", "on_path"):
            out[f"{name}/{k}"] = rec[k]
        print(f"[sim_record] {name}: {len(reqs)} samples, {len(rec['n'])} trees, "
              f"{rec['on_path'].sum(1).mean():.2f} on-path nodes per tree", flush=True)
    ps = [r.prompt_token_ids for r in workloads["rollout"][0][:64]]
    meta["prefill"] = {}
    for label, d in (("target", None), ("target+draft", draft)):
        engine = SpeculativeEngine(actor, d, strategy="none", max_slots=64, max_len=160, eos_token_id=eos)
        meta["prefill"][label] = prefill_ratio(engine, ps)
    print(f"[sim_record] prefill / plain step: {meta['prefill']}", flush=True)
    meta["threads"], meta["seconds"] = 1, round(time.time() - t0, 1)
    arrays = {}
    for k, v in out.items():
        arrays[k] = v.astype(np.float16) if v.dtype.kind == "f" else v.astype(np.int16 if k.endswith("/n") or
                                                                              k.endswith("/parents") else v.dtype)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, meta=np.array(json.dumps(meta)), **arrays)
    print(f"[sim_record] wrote {args.out} in {meta['seconds']} s", flush=True)
    return meta


if __name__ == "__main__":
    main()
