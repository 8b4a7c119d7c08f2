"""Draft kinds on one actor: accepted draft tokens per sample-step of each draft (a draft model, an EAGLE-style
head, ...) on the same prompts, strategies and sampling, with ratios against the first draft in the same run.

    python -m bench.draft_kinds --actor DIR --drafts LAYERCUT_DIR HEAD_DIR --prompts test.parquet [--quick]

`adaptive` runs under a drafting-friendly calibration (drafting always pays, `drafting.calibration`), so every
draft is judged by the same node choice and only its proposals differ; acceptance, not speed, is the question.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def run(actor: str, drafts: list[str], prompts: list[list[int]], strategies: list[str], temperature: float,
        max_new_tokens: int, seed: int, slots: int) -> dict:
    from drafting import SamplingParams, SpeculativeEngine
    from drafting.policy.calibration import drafting_friendly
    from drafting.model.head import draft_kind

    max_len = max(map(len, prompts)) + max_new_tokens + 1
    out = {}
    for d in drafts:
        for s in strategies:
            cal = None
            if s == "adaptive":
                probe = SpeculativeEngine(actor, d, strategy="none", max_slots=1, max_len=8)
                cal = drafting_friendly({**probe.calibration_key()})
            eng = SpeculativeEngine(actor, d, strategy=s, max_slots=slots, max_len=max_len, calibration=cal)
            t0 = time.perf_counter()
            outs = eng.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                                                        seed=seed))
            st = eng.stats()
            drafted = sum(o.stats["drafted"] for o in outs)
            accepted = sum(o.stats["accepted"] for o in outs)
            out[f"{d}|{s}"] = {"draft": d, "kind": draft_kind(d), "strategy": s,
                               "accepted_per_step": st.mean_accepted, "tokens_per_step": st.mean_tokens_per_step,
                               "accepted_per_drafted": accepted / max(drafted, 1), "tokens": st.tokens,
                               "seconds": round(time.perf_counter() - t0, 1)}
            print(json.dumps(out[f"{d}|{s}"]), flush=True)
    for s in strategies:
        base = out[f"{drafts[0]}|{s}"]["accepted_per_step"]
        for d in drafts[1:]:
            r = out[f"{d}|{s}"]
            r["ratio_vs_first"] = r["accepted_per_step"] / base if base > 0 else None
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--actor", required=True)
    p.add_argument("--drafts", nargs="+", required=True, help="draft model or head directories; the first is the "
                                                               "baseline of the ratios")
    p.add_argument("--prompts", required=True, help="Verl/OpenRLHF prompt file")
    p.add_argument("--strategies", default="adaptive,chain:4,tree:4,3,16")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="8 prompts, 32 new tokens, adaptive only")
    p.add_argument("--out", default="bench/results/draft_kinds.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    from trainer.loop.data import load_prompts

    n, new, strategies = a.num_prompts, a.max_new_tokens, a.strategies.split(",")
    if a.quick:
        n, new, strategies = 8, 32, ["adaptive"]
    # "tree:4,3,16" splits on the comma above: re-join strategy arguments
    joined, cur = [], None
    for part in strategies:
        if cur is not None and part[:1].isdigit():
            cur += "," + part
            joined[-1] = cur
        else:
            cur = part
            joined.append(part)
    tok = AutoTokenizer.from_pretrained(a.actor)
    prompts = [list(x.token_ids) for x in load_prompts(a.prompts, tok, 256, size=n)]
    res = {"args": vars(a), "threads": torch.get_num_threads(),
           "runs": run(a.actor, a.drafts, prompts, joined, a.temperature, new, a.seed, a.slots)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
