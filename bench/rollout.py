"""Rollout throughput on the tiny world: HF `generate` vs the speculative engine's strategies.

    python -m bench.rollout --out bench/results/rollout.json [--quick] [--threads 2]

One process, temperature 1.0, the task's long-tailed lengths. Peak RSS is sampled by a thread every 2 ms
(VmRSS from /proc, falling back to ru_maxrss) and reported per row as the peak during that row."""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import threading
import time
from pathlib import Path

import torch

from drafting import SamplingParams, SpeculativeEngine

STRATEGIES = ["none", "chain:2", "chain:4", "chain:8", "tree:2,2,4", "tree:3,2,6"]
QUICK = ["none", "chain:4", "tree:2,2,4"]


class PeakRSS:
    """Peak resident memory (MB) while the block runs, from a sampling thread."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.peak_mb, self._stop = every_s, 0.0, threading.Event()

    @staticmethod
    def now_mb() -> float:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.now_mb())
            time.sleep(self.every_s)

    def __enter__(self):
        self.peak_mb = self.now_mb()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak_mb = max(self.peak_mb, self.now_mb())


def load_world(n_prompts: int, random_models: bool, world_dir: str | None = None):
    """(actor, draft, prompt id lists, eos id, source). --random: untrained models of the world's shapes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.tiny import task

    if random_models:
        from trainer.tiny import models as tm
        from trainer.tiny.bootstrap import RECIPE

        tok = tm.build_tokenizer()
        V = len(tok.get_vocab())

        def mk(r: dict, seed: int):
            cfg = tm.llama_config(V, r["layers"], r["hidden"], r["heads"], r["kv_heads"], r["intermediate"],
                                  r["max_positions"])
            return tm.build_causal_lm(cfg, seed).eval()

        actor, draft = mk(RECIPE["actor"], 0), mk(RECIPE["draft"], 1)
        rows = [task.make_example(random.Random(i)) for i in range(n_prompts)]
        source = "random models with the tiny world's shapes (development only)"
    else:
        from trainer.tiny.bootstrap import ensure_tiny_world, world_at

        w = world_at(world_dir) if world_dir else ensure_tiny_world()
        tok = AutoTokenizer.from_pretrained(w.tokenizer_path)
        actor = AutoModelForCausalLM.from_pretrained(w.actor_path, dtype=torch.float32).eval()
        draft = AutoModelForCausalLM.from_pretrained(w.draft_path, dtype=torch.float32).eval()
        rows, source = task.read_prompts_jsonl(w.eval_prompts)[:n_prompts], f"tiny world at {w.root}"
    prompts = [tok(r["prompt"])["input_ids"] for r in rows]
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.convert_tokens_to_ids("<eos>")
    return actor, draft, prompts, eos, tok.pad_token_id or 0, source


def run_hf(actor, prompts, max_new, eos, pad, seed) -> dict:
    """HF generate, one left-padded batch, same sampling (temperature 1, no top-k/top-p)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], attn[b, T - len(p):] = torch.tensor(p), 1
    torch.manual_seed(seed)
    with torch.inference_mode(), PeakRSS() as rss:
        t0, c0 = time.perf_counter(), time.process_time()
        out = actor.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    gen = out[:, T:]
    steps = gen.shape[1]
    tokens = 0
    for row in gen.tolist():
        tokens += row.index(eos) + 1 if eos in row else len(row)
    return {"name": "hf_generate", "tokens": tokens, "seconds": dt, "cpu_seconds": cpu, "tokens_per_s": tokens / dt,
            "mean_accepted": 0.0, "tokens_per_sample_step": 1.0, "steps": steps, "step_ms": 1000 * dt / steps,
            "peak_rss_mb": rss.peak_mb}


def run_engine(actor, draft, strategy, prompts, max_new, eos, max_len, seed) -> dict:
    eng = SpeculativeEngine(actor, draft if strategy != "none" else None, strategy=strategy, max_slots=len(prompts),
                            max_len=max_len, eos_token_id=eos)
    sp = SamplingParams(temperature=1.0, max_new_tokens=max_new, seed=seed)
    eng.generate(prompts[:4], SamplingParams(temperature=1.0, max_new_tokens=8, seed=seed))  # warm-up
    eng.reset_stats()
    with torch.inference_mode(), PeakRSS() as rss:
        t0, c0 = time.perf_counter(), time.process_time()
        outs = eng.generate(prompts, sp)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    st = eng.stats()
    tokens = sum(len(o.token_ids) for o in outs)
    return {"name": strategy, "tokens": tokens, "seconds": dt, "cpu_seconds": cpu, "tokens_per_s": tokens / dt,
            "mean_accepted": st.mean_accepted, "tokens_per_sample_step": st.mean_tokens_per_step,
            "steps": st.steps, "step_ms": st.step_ms, "peak_rss_mb": rss.peak_mb}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="16 prompts and fewer strategies")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--prompts", type=int, default=None, help="number of eval prompts (default 64, quick 16)")
    ap.add_argument("--strategies", default=None, help="';'-separated, e.g. 'none;chain:4;tree:4,2,12'")
    ap.add_argument("--random", action="store_true", help="untrained models of the same shapes (development only)")
    ap.add_argument("--world", default=None, help="an already built tiny-world dir (default: ensure_tiny_world())")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per row; the fastest is kept (same seeds, same tokens)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from trainer.tiny import task

    n = args.prompts or (16 if args.quick else 64)
    actor, draft, prompts, eos, pad, source = load_world(n, args.random, args.world)
    max_new = task.MAX_LEN + 1  # answer up to MAX_LEN digits + <eos>
    max_len = max(len(p) for p in prompts) + max_new + 1
    if args.strategies:
        strategies = [s.strip() for s in args.strategies.split(";") if s.strip()]
    else:
        strategies = QUICK if args.quick else STRATEGIES

    best = lambda runs: min(runs, key=lambda r: r["seconds"])  # noqa: E731
    rows = [best([run_hf(actor, prompts, max_new, eos, pad, args.seed) for _ in range(args.repeats)])]
    print(f"{'name':<14}{'tok/s':>9}{'cpu_s':>7}{'speedup':>9}{'acc/step':>10}{'tok/step':>10}{'step_ms':>9}"
          f"{'steps':>7}{'rss_mb':>9}")

    def show(r):
        print(f"{r['name']:<14}{r['tokens_per_s']:>9.1f}{r['cpu_seconds']:>7.2f}{r['speedup_vs_hf']:>9.2f}"
              f"{r['mean_accepted']:>10.2f}"
              f"{r['tokens_per_sample_step']:>10.2f}{r['step_ms']:>9.1f}{r['steps']:>7}{r['peak_rss_mb']:>9.0f}",
              flush=True)

    rows[0]["speedup_vs_hf"] = 1.0
    show(rows[0])
    for s in strategies:
        r = best([run_engine(actor, draft, s, prompts, max_new, eos, max_len, args.seed) for _ in range(args.repeats)])
        r["speedup_vs_hf"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        rows.append(r)
        show(r)
    result = {"rows": rows, "config": {
        "source": source, "prompts": len(prompts), "temperature": 1.0, "top_k": 0, "top_p": 1.0,
        "max_new_tokens": max_new, "max_len": max_len, "max_slots": len(prompts), "threads": args.threads,
        "repeats": args.repeats,
        "prompt_lens": [len(p) for p in prompts], "seed": args.seed, "torch": torch.__version__,
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "notes": "tokens = generated tokens incl. EOS; hf_generate steps = forward passes of the padded batch; "
                 "engine step_ms = mean engine.step() time incl. admission/prefill; cpu_seconds = process CPU "
                 "time (all threads; less sensitive to other load than wall time); mean_accepted = accepted draft "
                 "tokens per sample-step; peak_rss_mb = peak VmRSS of the process while the row ran (sampled)."}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
