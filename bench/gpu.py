"""The engine on one GPU, in one prepared call: speed against the roofline, kernels and host syncs per step,
per-forward cost of speculative steps, correctness on CUDA, the tiny world on the GPU, and rollout drafts (chains
from the rollout itself, alone and with the draft model) on the tiny world at 1, 16 and 64 live samples.

    RLHFSPEC_CACHE=DIR python -m bench.gpu --out FILE.json [--quick] [--budget-s 480]
    python -m bench.gpu --smoke --out /tmp/gpu.json     # the same script on CPU with small shapes (a test run)

Models: an 8B-shaped Llama target (Llama-3-8B config) and a 1B-shaped draft (Llama-3.2-1B config) with random
bf16 weights built on the device (random weights accept almost nothing, so every step emits one token and a
row is the cost of a step), a 1-layer draft of the target's width (EAGLE-sized), and the tiny world carried in
RLHFSPEC_CACHE (real acceptance). 512-token prompts, 64 new tokens, greedy; decode-only (prefill subtracted).

The roofline of a forward is the larger of its bytes (weights, plus the K/V of its context) at the memory
bandwidth and its FLOPs at the matrix rate (4.8 TB/s and 790 TFLOP/s on an H200; both also measured here).
Imports only torch, transformers, numpy, scikit-learn and the project (the GPU machine has no Ray, DeepSpeed or
W&B). Sections run in order of importance inside a time budget; the JSON is rewritten after each, so a section
that fails or runs out of time leaves the others' results."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from drafting import GenRequest, SamplingParams, SpeculativeEngine
from drafting.model.decoder import EagerOps, compiled_ops

PEAK_BW, PEAK_FLOPS = 4.8e12, 790e12  # H200: HBM3e bandwidth, dense bf16 matrix rate (measured here: KINDS.md)
STRATEGIES = ["none", "chain:4", "tree:3,2,6", "adaptive"]
SHAPES = {  # Llama-3-8B, Llama-3.2-1B, and a 1-layer draft of the 8B's width
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "eagle": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_attention_heads=32,
                  num_key_value_heads=8, tie_word_embeddings=False),
}
SMOKE_SHAPES = {  # --smoke: the same code on CPU in a minute
    "8b": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=False),
    "1b": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
    "eagle": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False),
}


class Bench:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.dev = torch.device("cpu" if args.smoke else "cuda")
        self.t0 = time.perf_counter()
        self.out = Path(args.out)
        self.res = {"config": {"argv": sys.argv[1:], "quick": args.quick, "smoke": args.smoke,
                               "machine": platform.node(), "torch": torch.__version__},
                    "errors": {}, "section_seconds": {}}
        self.prompt_len, self.new = (24, 8) if self.smoke else (512, 64)
        self.lives = [1, 4] if self.smoke else ([1, 64] if args.quick else [1, 16, 64, 128])
        self.max_len = self.prompt_len + self.new + 64

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.res, indent=1, default=float))
        tmp.replace(self.out)

    def section(self, name: str, fn, need_s: float = 0.0) -> None:
        if self.left() < need_s:
            self.res["errors"][name] = f"skipped: {self.left():.0f} s left of the budget, needs ~{need_s:.0f}"
            print(f"[{name}] skipped (budget)", flush=True)
            self.save()
            return
        t = time.perf_counter()
        print(f"[{name}] start ({self.left():.0f} s left)", flush=True)
        try:
            fn(self)
        except Exception:  # noqa: BLE001 - one section's failure must not lose the others
            self.res["errors"][name] = traceback.format_exc()[-3000:]
            print(f"[{name}] FAILED\n{self.res['errors'][name]}", flush=True)
        finally:
            if self.dev.type == "cuda":
                torch.cuda.synchronize()
            self.res["section_seconds"][name] = round(time.perf_counter() - t, 1)
            self.save()


# ---- models and rooflines --------------------------------------------------------------------------------------
def hf_llama(shape: dict, dtype: torch.dtype, device, seed: int = 0, vocab: int = 128256, init: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, initializer_range=init,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None, **shape)
    torch.manual_seed(seed)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(before)
    return model


class Roofline:
    """Bytes and FLOPs of one forward of a decoder: weights read once, each row's visible K/V read once."""

    def __init__(self, decoder, bw: float = PEAK_BW, flops: float = PEAK_FLOPS):
        s = decoder.shape
        layer = sum(t.numel() for w in decoder.layers for t in w.values() if t is not None)
        self.matmul_params = layer + decoder.lm_head.numel()
        self.weight_bytes = (layer + decoder.lm_head.numel() + decoder.norm.numel()) * decoder.embed.element_size()
        self.kv_per_pos = 2 * s.layers * s.kv_heads * s.head_dim * decoder.embed.element_size()
        self.attn_flops_per_key = 4 * s.layers * s.heads * s.head_dim
        self.bw, self.flops = bw, flops

    def seconds(self, tokens: int, keys: int) -> float:
        """tokens: new tokens in the forward (all rows); keys: sum over those tokens' rows of visible keys read
        (K/V bytes count each row's context once; FLOPs count it per token)."""
        return max((self.weight_bytes + keys * self.kv_per_pos) / self.bw,
                   (2 * self.matmul_params * tokens + self.attn_flops_per_key * keys) / self.flops)


def measure_ceilings(dev) -> dict:
    """Copy bandwidth (bytes read + written) and bf16 matmul rate on this GPU, as METHOD.md asks."""
    n = 1 << 30
    a, b = torch.empty(n, dtype=torch.uint8, device=dev), torch.empty(n, dtype=torch.uint8, device=dev)
    a.random_(0, 255)
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        b.copy_(a)
        x @ y
    out = {}
    for name, fn, work in (("copy_bytes_per_s", lambda: b.copy_(a), 2 * n),
                           ("bf16_flops_per_s", lambda: x @ y, 2 * 8192 ** 3)):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(10):
            fn()
        e1.record()
        torch.cuda.synchronize()
        out[name] = work * 10 / (e0.elapsed_time(e1) / 1000)
    del a, b, x, y
    torch.cuda.empty_cache()
    return out


# ---- engine runs -----------------------------------------------------------------------------------------------
def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=g).tolist()


def decode_run(engine: SpeculativeEngine, prompts, new: int, temperature: float = 0.0, seed: int = 1) -> dict:
    """Generate; per-step figures from the engine's step log, decode-only (prefill = the admission steps)."""
    engine.reset_stats()
    engine.step_log.clear()
    outs = engine.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=new, seed=seed))
    log = list(engine.step_log)
    # decode-only: the first step waits for the prefill its admission launched (asynchronously on a GPU), so it
    # is left out, with the tokens it emitted
    decode = sum(s["t_total"] for s in log[1:])
    tokens = sum(len(o.token_ids) for o in outs) - (log[0]["live"] + log[0]["accepted"])
    steady = [s for s in log[2:] if s["live"] == len(prompts)] or log
    spec = [s for s in steady if not s.get("plain")]
    med = lambda xs: float(statistics.median(xs)) if xs else None  # noqa: E731
    row = {"tokens": tokens, "decode_s": decode, "tok_s": tokens / decode, "steps": len(log),
           "step_ms": 1000 * med([s["t_total"] - s["t_admit"] for s in steady]),
           "accepted_per_step": sum(s["accepted"] for s in log) / max(sum(s["live"] for s in log), 1),
           "plain_frac": 1 - len([s for s in log if not s.get("plain")]) / max(len(log), 1),
           "policy_ms": 1000 * med([s["t_policy"] for s in steady]),
           "sync_ms": 1000 * med([s.get("t_sync", 0.0) for s in steady])}
    if spec:
        row.update({"root_ms": 1000 * med([s["t_root"] for s in spec]),
                    "levels_ms": [1000 * med([s["t_levels"][i] for s in spec if len(s["t_levels"]) > i])
                                  for i in range(max(len(s["t_levels"]) for s in spec))],
                    "verify_ms": 1000 * med([s["t_verify"] for s in spec]),
                    "verify_width": med([s["width"] for s in spec]), "levels": med([s["levels"] for s in spec]),
                    "level_widths": spec[-1]["level_widths"]})
    plain = [s for s in steady if s.get("plain")]
    if plain:
        row["plain_stage_ms"] = 1000 * med([s["t_plain"] for s in plain])
    row["outputs"] = [o.token_ids for o in outs]
    return row


def hf_decode(hf, prompts, new: int) -> float:
    """HF generate tok/s, greedy, decode-only: the time of `new` tokens minus the time of one."""
    ids = torch.tensor(prompts, device=hf.device)
    mask = torch.ones_like(ids)

    def timed(n):
        torch.cuda.synchronize() if ids.is_cuda else None
        t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, pad_token_id=0)
        torch.cuda.synchronize() if ids.is_cuda else None
        return time.perf_counter() - t

    timed(2)  # warm-up
    return len(prompts) * (new - 1) / (timed(new) - timed(1))


def kernel_kind(name: str) -> str:
    """A kernel's family, by its name: what a step's device time is spent on."""
    n = name.lower()
    if "tree_attention" in n or "combine_splits" in n or "fmha" in n or "attention" in n or "flash" in n:
        return "attention"
    if any(t in n for t in ("gemm", "gemv", "cutlass", "nvjet", "sm90_xmma", "cublas", "splitk")):
        return "matmul"
    if "triton_" in n:
        return "fused elementwise (torch.compile)"
    if "index" in n or "scatter" in n or "gather" in n:
        return "index / gather / scatter"
    if "reduce" in n or "softmax" in n or "topk" in n or "sort" in n or "argmax" in n:
        return "reductions, softmax, top-k, sort"
    return "other elementwise"


def profile_steps(engine: SpeculativeEngine, prompts, steps: int) -> dict:
    """Kernels and host syncs per steady-state step, from a torch.profiler trace of `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    for i, p in enumerate(prompts):
        engine.add(GenRequest(("prof", i), p, SamplingParams(temperature=0.0, max_new_tokens=10 ** 6)))
    for _ in range(4):  # admission, warm-up, capture
        engine.step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            engine.step()
    for i in range(len(prompts)):
        engine.remove(("prof", i))
    names = [e.name for e in prof.events()]
    count = lambda keys: sum(1 for n in names if n in keys)  # noqa: E731
    kernel_events = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")
                     and "Memcpy" not in e.name and "Memset" not in e.name]
    kernels = len(kernel_events)
    by_name, by_kind = {}, {}
    for e in kernel_events:
        us = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) or 0.0
        by_name[e.name] = by_name.get(e.name, 0.0) + us
        kind = kernel_kind(e.name)
        by_kind[kind] = by_kind.get(kind, 0.0) + us
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {"steps": steps,
            "kernel_us_per_step": {k: round(v / steps, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels_us_per_step": [(n[:90], round(v / steps, 1)) for n, v in top],
            "kernels_per_step": kernels / steps,
            "kernel_launches_per_step": count({"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                                               "cuLaunchKernelEx"}) / steps,
            "graph_launches_per_step": count({"cudaGraphLaunch"}) / steps,
            "host_syncs_per_step": count({"cudaStreamSynchronize", "cudaDeviceSynchronize",
                                          "cudaEventSynchronize"}) / steps,
            "memcpy_calls_per_step": count({"cudaMemcpyAsync", "cudaMemcpy"}) / steps}


# ---- sections --------------------------------------------------------------------------------------------------
def section_env(b: Bench) -> None:
    env = {"device": str(b.dev)}
    if b.dev.type == "cuda":
        p = torch.cuda.get_device_properties(b.dev)
        env.update({"gpu": p.name, "sms": p.multi_processor_count, "memory_gb": round(p.total_memory / 2**30, 1),
                    "cuda": torch.version.cuda})
        env.update(measure_ceilings(b.dev))
    import transformers

    env["transformers"] = transformers.__version__
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    b.res["env"] = env


def section_attention(b: Bench) -> None:
    """The candidate attention kernels alone, at the 8B's heads, reading K/V in place from a cache."""
    from drafting.model.attention import Attention

    Hq, Hkv, D = (32, 8, 128) if not b.smoke else (4, 2, 64)
    dt = torch.bfloat16 if not b.smoke else torch.float32
    ctx, cols = b.prompt_len + b.new // 2, b.max_len + 65
    rows = []
    for B in ([1, 64] if not b.smoke else [1, 3]):
        for T in (1, 7):
            g = torch.Generator(device=b.dev).manual_seed(B * 10 + T)
            cache = torch.randn(2, B + 2, Hkv, cols, D, device=b.dev, dtype=dt, generator=g)
            k, v = cache[0], cache[1]
            q = torch.randn(B, T, Hq, D, device=b.dev, dtype=dt, generator=g).transpose(1, 2)
            prefix = torch.full((B,), ctx - 1, device=b.dev, dtype=torch.long)
            tail = torch.ones(T, T, dtype=torch.bool, device=b.dev).tril().expand(B, T, T).contiguous()
            ref = Attention("sdpa", prefix.cpu(), tail.cpu(), T, cols, Hq, Hkv)(
                q.float().cpu(), k[:B].float().cpu(), v[:B].float().cpu())
            cands = {}
            if b.dev.type == "cuda":
                cands["sdpa_efficient_gqa_folded"] = Attention("sdpa", prefix, tail, T, cols, Hq, Hkv)
                mask = Attention("sdpa", prefix.cpu(), tail.cpu(), T, cols, Hq, Hkv).mask.to(b.dev)
                cands["sdpa_default_enable_gqa"] = lambda q_, k_, v_: torch.nn.functional.scaled_dot_product_attention(
                    q_, k_[:, :, :cols], v_[:, :, :cols], attn_mask=mask, enable_gqa=True)
                cands["triton"] = Attention("triton", prefix, tail, T, cols, Hq, Hkv)
                cands["triton_paged"] = paged_candidate(Attention("triton", prefix, tail, T, cols, Hq, Hkv), k, v, B)
                if T == 1 and b.left() > 300:  # compiled per shape: two shapes only
                    try:
                        flex = flex_candidate(prefix, tail, B, T, cols, Hq, Hkv)
                        if flex is not None:
                            cands["flex_attention"] = flex
                    except Exception as e:  # noqa: BLE001
                        rows.append({"live": B, "tokens": T, "kernel": "flex_attention",
                                     "error": f"{type(e).__name__}: {e}"[:400]})
            else:
                cands["sdpa"] = Attention("sdpa", prefix, tail, T, cols, Hq, Hkv)
            kv_bytes = 2 * B * Hkv * (ctx - 1 + T) * D * cache.element_size()
            for name, fn in cands.items():
                try:
                    out = fn(q, k[:B], v[:B])
                    err = float((out.float().cpu() - ref).abs().max())
                    us = time_call(lambda: fn(q, k[:B], v[:B]), b.dev)
                    rows.append({"live": B, "tokens": T, "ctx": ctx, "kernel": name, "us": us, "max_abs_err": err,
                                 "kv_gb_per_s": kv_bytes / (us * 1e-6) / 1e9})
                except Exception as e:  # noqa: BLE001 - a candidate that fails is reported, not fatal
                    rows.append({"live": B, "tokens": T, "kernel": name, "error": f"{type(e).__name__}: {e}"[:400]})
    b.res["attention_kernels"] = rows


def paged_candidate(attend, k, v, B: int, page: int = 16):
    """The same rows' K/V scattered over a page pool in shuffled order (the paged cache), read through the page
    table in place by the Triton kernel: what paging costs the kernel against the dense rows."""
    Hkv, cols, D = k.shape[1:]
    per_row = -(-cols // page)
    g = torch.Generator().manual_seed(B)
    table = torch.randperm(B * per_row + 1, generator=g)[:B * per_row].view(B, per_row).to(k.device)
    pools = []
    for src in (k, v):
        pool = torch.zeros(B * per_row + 1, page, Hkv, D, device=k.device, dtype=k.dtype)
        padded = torch.nn.functional.pad(src[:B], (0, 0, 0, per_row * page - cols))  # [B, Hkv, per_row * page, D]
        pool[table.reshape(-1)] = padded.view(B, Hkv, per_row, page, D).permute(0, 2, 3, 1, 4).reshape(-1, page, Hkv, D)
        pools.append(pool)
    return lambda q_, k_, v_: attend(q_, pools[0], pools[1], table=table)


def flex_candidate(prefix, tail, B, T, cols, Hq, Hkv):
    """FlexAttention with a block mask from the same prefix + tail description (compiled once per shape)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    Tt = tail.shape[-1]

    def mask_mod(b, h, q_idx, kv_idx):
        rel = kv_idx - prefix[b]
        inside = (rel >= 0) & (rel < Tt)
        return (kv_idx < prefix[b]) | (inside & tail[b, q_idx, rel.clamp(0, Tt - 1)])

    block_mask = create_block_mask(mask_mod, B, None, T, cols, device=prefix.device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k[:, :, :cols], v[:, :, :cols], block_mask=block_mask, enable_gqa=True)


def time_call(fn, dev, reps: int = 20) -> float:
    """Median microseconds per call of the device work: `reps` calls captured in one CUDA graph, replayed 10
    times (no host launch cost in the figure, as in the engine)."""
    for _ in range(3):
        fn()
    if dev.type != "cuda":
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return 1e6 * statistics.median(ts)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph.capture_begin()
        for _ in range(reps):
            fn()
        graph.capture_end()
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) * 1000 / reps)
    return float(statistics.median(ts))


class World8B:
    """The 8B/1B pair, its HF target for `generate`, and one engine all strategies share (its graphs too)."""

    def __init__(self, b: Bench):
        shapes = SMOKE_SHAPES if b.smoke else SHAPES
        dt = torch.bfloat16 if not b.smoke else torch.float32
        vocab = 128256 if not b.smoke else 512
        t = time.perf_counter()
        self.hf = hf_llama(shapes["8b"], dt, b.dev, seed=0, vocab=vocab)
        self.hf_draft = hf_llama(shapes["1b"], dt, b.dev, seed=1, vocab=vocab)
        self.vocab = vocab
        self.engine = SpeculativeEngine(self.hf, self.hf_draft, strategy="none", max_slots=max(b.lives),
                                        max_len=b.max_len, device=b.dev, dtype=dt, eos_token_id=None,
                                        compile=b.args.compile, kv_cache=b.args.kv_cache)
        self.compile_error = None
        if b.args.compile is not False and b.dev.type == "cuda":
            try:  # compile the fused ops once now; if the image's compiler cannot, run eager and say so
                decode_run(self.engine, random_prompts(2, 16, vocab, seed=0), 3)
            except Exception as e:  # noqa: BLE001
                self.compile_error = f"{type(e).__name__}: {e}"[:800]
                for m in (self.engine.target, self.engine.draft):
                    m.ops = EagerOps
                self.engine.graphs = type(self.engine.graphs)(self.engine.device, True)
        self.build_s = time.perf_counter() - t
        self.target_roof = Roofline(self.engine.target)
        self.draft_roof = Roofline(self.engine.draft)


def section_speed(b: Bench) -> None:
    """The issue's table: per live-sample count, tok/s and ms per step of each strategy, HF generate, roofline."""
    w = b.world = World8B(b)
    eng, roof = w.engine, w.target_roof
    b.res["models"] = {"build_s": w.build_s, "target_weight_gb": roof.weight_bytes / 1e9,
                       "draft_weight_gb": w.draft_roof.weight_bytes / 1e9,
                       "kv_bytes_per_position_target": roof.kv_per_pos,
                       "attention": {"target": eng.target.attention, "draft": eng.draft.attention},
                       "compiled_ops": eng.target.ops is not EagerOps, "compile_error": w.compile_error}
    table, runs = [], {}
    for B in b.lives:
        prompts = random_prompts(B, b.prompt_len, w.vocab, seed=B)
        ctx = b.prompt_len + b.new // 2  # the mean context of a decode step
        row = {"live": B, "ctx_mean": ctx}
        plain_roof = roof.seconds(B, B * ctx)
        row["roofline_tok_s"] = B / plain_roof
        for name in STRATEGIES:
            if name == "adaptive" and eng.calibration is None:
                continue
            eng.set_strategy(name)
            decode_run(eng, prompts[: max(1, B)], 6)  # warm-up: every stage's graph captured
            r = decode_run(eng, prompts, b.new)
            runs[(B, name)] = r
            row[f"{name}_tok_s"], row[f"{name}_step_ms"] = r["tok_s"], r["step_ms"]
            row[f"{name}_accepted_per_step"] = r["accepted_per_step"]
            if "plain_stage_ms" in r and name == "none":
                row["none_device_ms"] = r["plain_stage_ms"]  # the plain stage's device time (CUDA events)
        row["plain_frac_of_roofline"] = row["none_tok_s"] / row["roofline_tok_s"]
        for name in STRATEGIES[1:]:
            if f"{name}_step_ms" in row:
                ratio = row[f"{name}_step_ms"] / row["none_step_ms"]
                row[f"{name}_over_plain"] = ratio
                row[f"{name}_break_even_accepted"] = ratio - 1  # accepted tokens per step for the same rate
        if b.left() > 60 or b.smoke:
            row["hf_generate_tok_s"] = hf_decode(w.hf, prompts, b.new)
            row["x_hf_generate"] = row["none_tok_s"] / row["hf_generate_tok_s"]
        table.append(row)
        b.res["speed_table"] = table
        b.save()
    b.res["forwards"] = forward_rows(b, runs)
    b.res["graphs"] = eng.graphs.summary()
    if eng.device.type == "cuda":
        b.res["graphs"]["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(eng.device) / 2**30


def forward_rows(b: Bench, runs: dict, draft_roof=None) -> list:
    """Each speculative stage's time (graph replay, CUDA events) over the roofline of its forward: the draft's
    catch-up (with the first level's children), each further level, the verify. A stage also does the tree's
    bookkeeping, so this bounds the forward's own cost from above."""
    from drafting.policy.strategy import parse_strategy

    w = b.world
    droof, troof = draft_roof or w.draft_roof, w.target_roof
    ctx = b.prompt_len + b.new // 2
    rows = []
    for (B, name), r in runs.items():
        if "root_ms" not in r:
            continue
        k = 2 if name == "adaptive" else parse_strategy(name).topk
        lag = 1 + round(r["accepted_per_step"])
        rows.append({"live": B, "strategy": name, "forward": "draft catch-up", "ms": r["root_ms"],
                     "roofline_ms": 1000 * droof.seconds(B * lag, B * lag * ctx)})
        size = k
        for i, ms in enumerate(r["levels_ms"]):
            wd = r["level_widths"][i] if i < len(r["level_widths"]) else 1
            rows.append({"live": B, "strategy": name, "forward": f"draft level {i + 2} ({wd} per sample)", "ms": ms,
                         "roofline_ms": 1000 * droof.seconds(B * wd, B * wd * (ctx + size))})
            size += wd * k
        T = int(r["verify_width"])
        rows.append({"live": B, "strategy": name, "forward": f"verify ({T} per sample)", "ms": r["verify_ms"],
                     "roofline_ms": 1000 * troof.seconds(B * T, B * T * (ctx + T))})
    for row in rows:
        row["over_roofline"] = row["ms"] / row["roofline_ms"]
    return rows


def section_syncs(b: Bench) -> None:
    """Kernels, graph launches and host syncs per steady-state step."""
    eng, w = b.world.engine, b.world
    rows = []
    for B in ([1, 64] if not b.smoke else [1, 4]):
        for name in ("none", "tree:3,2,6") + (("adaptive",) if eng.calibration is not None else ()):
            eng.set_strategy(name)
            r = profile_steps(eng, random_prompts(B, b.prompt_len, w.vocab, seed=7), steps=8)
            rows.append({"live": B, "strategy": name, **r})
        # the same steps eager (graphs off): what the graphs save
    graphs, eng.graphs = eng.graphs, type(eng.graphs)(eng.device, False)
    try:
        eng.set_strategy("none")
        r = profile_steps(eng, random_prompts(1, b.prompt_len, w.vocab, seed=7), steps=4)
        rows.append({"live": 1, "strategy": "none (eager, no graphs)", **r})
    finally:
        eng.graphs = graphs
    b.res["kernels_and_syncs"] = rows


def section_calibration(b: Bench) -> None:
    """Profile the 8B/1B pair with CUDA events (a quick grid), so `adaptive` can run; kept in the output."""
    from drafting.calibrate.profile import profile_engine, summary

    eng = b.world.engine
    eng.set_strategy("none")
    grid = ([1, 16, 64] if not b.smoke else [1, 2, 4])
    ctxs = [64, b.prompt_len] if not b.smoke else [10, 24]
    t = time.perf_counter()
    cal = profile_engine(eng, quick=True, repeats=2, live_grid=grid, ctx_grid=ctxs, verbose=True)
    eng.calibration = cal
    b.res["calibration"] = {"seconds": time.perf_counter() - t, "summary": summary(cal),
                            "saturation_live": cal.saturation_live, "cv_error": cal.cv_error,
                            "step_cv_error": cal.step_cv_error}
    cal.save(b.out.parent / "h200_calibration.json")


def section_adaptive(b: Bench) -> None:
    """`adaptive` (device mode: the step's shape from earlier steps, nothing read inside a step) at each live
    count, into the speed table."""
    eng, w = b.world.engine, b.world
    runs = {}
    for row in b.res.get("speed_table", []):
        B = row["live"]
        prompts = random_prompts(B, b.prompt_len, w.vocab, seed=B)
        eng.set_strategy("adaptive")
        decode_run(eng, prompts, 32)  # warm-up: the shapes it picks are captured on their second use
        r = decode_run(eng, prompts, b.new)
        runs[(B, "adaptive")] = r
        row.update({"adaptive_tok_s": r["tok_s"], "adaptive_step_ms": r["step_ms"],
                    "adaptive_plain_frac": r["plain_frac"], "adaptive_policy_ms": r["policy_ms"],
                    "adaptive_accepted_per_step": r["accepted_per_step"],
                    "adaptive_over_plain": r["step_ms"] / row["none_step_ms"]})
        b.save()
    b.res["forwards"] = b.res.get("forwards", []) + forward_rows(b, runs)


def section_eagle(b: Bench) -> None:
    """A 1-layer draft of the target's width (EAGLE-sized): how the break-even moves with draft size."""
    w = b.world
    shapes = SMOKE_SHAPES if b.smoke else SHAPES
    dt = w.engine.dtype
    hf = hf_llama(shapes["eagle"], dt, b.dev, seed=2, vocab=w.vocab)
    eng = SpeculativeEngine(w.engine.target, hf, strategy="tree:3,2,6", max_slots=max(b.lives), max_len=b.max_len,
                            device=b.dev, dtype=dt, eos_token_id=None, compile=b.args.compile)
    roof = Roofline(eng.draft)
    rows, runs = [], {}
    for B in [x for x in b.lives if x <= 64]:
        prompts = random_prompts(B, b.prompt_len, w.vocab, seed=B)
        plain = next((r for r in b.res.get("speed_table", []) if r["live"] == B), None)
        for name in ("chain:4", "tree:3,2,6"):
            eng.set_strategy(name)
            decode_run(eng, prompts, 6)
            r = decode_run(eng, prompts, b.new)
            runs[(B, name)] = r
            row = {"live": B, "strategy": name, "draft": "1 layer x 4096 (EAGLE-sized)", "step_ms": r["step_ms"]}
            if plain:
                row["over_plain"] = r["step_ms"] / plain["none_step_ms"]
                row["break_even_accepted"] = row["over_plain"] - 1
                row["with_1b_draft_over_plain"] = plain.get(f"{name}_over_plain")
            rows.append(row)
    b.res["eagle_sized_draft"] = {"rows": rows, "forwards": forward_rows(b, runs, draft_roof=roof)}
    del eng, hf
    if b.dev.type == "cuda":
        torch.cuda.empty_cache()


def section_compile(b: Bench) -> None:
    """Plain steps with and without torch.compile's fused norms, RoPE and activations (graphs on in both)."""
    eng, w = b.world.engine, b.world
    rows = []
    original = eng.target.ops
    for label, ops in (("eager ops", EagerOps), ("torch.compile ops", compiled_ops())):
        eng.target.ops = eng.draft.ops = ops
        eng.graphs = type(eng.graphs)(eng.device, True)
        eng.set_strategy("none")
        t = time.perf_counter()
        for B in ([1, 64] if not b.smoke else [1, 4]):
            prompts = random_prompts(B, b.prompt_len, w.vocab, seed=B)
            for name in ("none", "tree:3,2,6"):
                eng.set_strategy(name)
                decode_run(eng, prompts, 6)
                r = decode_run(eng, prompts, b.new)
                rows.append({"ops": label, "live": B, "strategy": name, "step_ms": r["step_ms"], "tok_s": r["tok_s"],
                             "verify_ms": r.get("verify_ms"), "levels_ms": r.get("levels_ms"),
                             "root_ms": r.get("root_ms"), "since_start_s": time.perf_counter() - t})
                b.res["compile"] = rows
                b.save()
    eng.target.ops = eng.draft.ops = original
    b.res["compile"] = rows


def section_correctness(b: Bench) -> None:
    """Greedy equality with HF generate (fp32, TF32 off) and seeded identity across strategies and batch sizes
    (fp32 and bf16), on the tiny world (real, peaked distributions) and a random model with 128-wide heads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.tiny.bootstrap import world_at

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    world = world_at(tiny_dir())
    tok = AutoTokenizer.from_pretrained(world.tokenizer_path)
    rows = [json.loads(line) for line in open(world.eval_prompts)][:16]
    prompts = [tok(r["prompt"])["input_ids"] for r in rows]
    eos = tok.eos_token_id
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        actor = AutoModelForCausalLM.from_pretrained(world.actor_path, dtype=dt).to(b.dev).eval()
        draft = AutoModelForCausalLM.from_pretrained(world.draft_path, dtype=dt).to(b.dev).eval()
        cal = friendly_calibration(actor, draft, b.dev, dt)
        name = str(dt).removeprefix("torch.")
        if dt == torch.float32:
            ref = []
            for p in prompts:
                ids = torch.tensor([p], device=b.dev)
                g = actor.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                                   eos_token_id=eos, pad_token_id=0)
                ref.append(g[0, len(p):].tolist())
            ref = [r[:r.index(eos) + 1] if eos in r else r for r in ref]
            greedy = {}
            for strat in ("none", "chain:3", "tree:3,2,6", "adaptive"):
                eng = SpeculativeEngine(actor, draft, strategy=strat, max_slots=8, max_len=160, device=b.dev,
                                        dtype=dt, eos_token_id=eos, calibration=cal)
                got = [o.token_ids for o in eng.generate(prompts, SamplingParams(temperature=0.0,
                                                                                  max_new_tokens=24))]
                greedy[strat] = sum(a == r for a, r in zip(got, ref))
            out["tiny_greedy_equal_to_hf_of_16"] = greedy
        seeded = {}
        base = None
        for strat, slots in (("none", 16), ("none", 1), ("chain:4", 16), ("tree:3,2,6", 16), ("tree:3,2,6", 3),
                             ("adaptive", 16)):
            eng = SpeculativeEngine(actor, draft, strategy=strat, max_slots=slots, max_len=160, device=b.dev,
                                    dtype=dt, eos_token_id=eos, calibration=cal)
            got = [o.token_ids for o in eng.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=48,
                                                                              seed=11))]
            base = got if base is None else base
            seeded[f"{strat}@{slots}"] = sum(a == r for a, r in zip(got, base))
        out[f"tiny_seeded_identical_to_none@16_of_16_{name}"] = seeded
    # a random model with the 8B's head size: greedy equality through the 128-wide Triton path, fp32
    shapes = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False)
    t_hf = hf_llama(shapes, torch.float32, b.dev, seed=3, vocab=2048, init=0.08)
    d_hf = hf_llama({**shapes, "num_hidden_layers": 1}, torch.float32, b.dev, seed=4, vocab=2048, init=0.08)
    prompts = random_prompts(8, 40, 2048, seed=5)
    ref = []
    for p in prompts:
        ids = torch.tensor([p], device=b.dev)
        ref.append(t_hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                                 pad_token_id=0)[0, len(p):].tolist())
    greedy = {}
    for strat in ("none", "chain:3", "tree:3,2,6"):
        eng = SpeculativeEngine(t_hf, d_hf, strategy=strat, max_slots=4, max_len=96, device=b.dev,
                                dtype=torch.float32, eos_token_id=None)
        got = [o.token_ids for o in eng.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=16))]
        greedy[strat] = sum(a == r for a, r in zip(got, ref))
    out["head128_greedy_equal_to_hf_of_8"] = greedy
    out["attention"] = {"target": eng.target.attention, "draft": eng.draft.attention}
    b.res["correctness"] = out


def tiny_dir() -> Path:
    root = Path(os.environ.get("RLHFSPEC_CACHE", Path.home() / ".cache" / "rlhfspec")).expanduser()
    return root / "tiny"


def friendly_calibration(actor, draft, dev, dt):
    """For exactness checks: `adaptive` drafts (deep and wide) whatever the hardware says."""
    from drafting.policy.calibration import drafting_friendly

    key = SpeculativeEngine(actor, draft, strategy="none", max_slots=1, max_len=16, device=dev,
                            dtype=dt).calibration_key()
    return drafting_friendly(key)


def tiny_calibration(actor, draft, dev, dt):
    """A quick profile of the tiny pair on this device (adaptive decides from it)."""
    from drafting.calibrate.profile import profile_engine

    eng = SpeculativeEngine(actor, draft, strategy="none", max_slots=64, max_len=160, device=dev, dtype=dt)
    return profile_engine(eng, quick=True, repeats=2, live_grid=[1, 8, 64], ctx_grid=[16, 96], verbose=False)


def section_tiny(b: Bench) -> None:
    """The tiny world's RLHF-sized rollout on the GPU (64 prompts x 4 samples, temperature 1): adaptive against
    plain decoding and every fixed strategy (real acceptance)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.tiny.bootstrap import world_at

    world = world_at(tiny_dir())
    tok = AutoTokenizer.from_pretrained(world.tokenizer_path)
    rows = [json.loads(line) for line in open(world.eval_prompts)]
    n = 16 if (b.smoke or b.args.quick) else 64
    prompts = [tok(r["prompt"])["input_ids"] for r in rows[:n] for _ in range(4)]
    warm = [tok(r["prompt"])["input_ids"] for r in rows[n:2 * n] for _ in range(4)]
    dt = torch.float32
    actor = AutoModelForCausalLM.from_pretrained(world.actor_path, dtype=dt).to(b.dev).eval()
    draft = AutoModelForCausalLM.from_pretrained(world.draft_path, dtype=dt).to(b.dev).eval()
    cal = tiny_calibration(actor, draft, b.dev, dt)
    out = []
    for strat in ("none", "chain:2", "chain:4", "tree:3,2,6", "tree:4,2,10", "adaptive"):
        eng = SpeculativeEngine(actor, draft, strategy=strat, max_slots=64, max_len=160, device=b.dev, dtype=dt,
                                eos_token_id=tok.eos_token_id, calibration=cal)
        decode_run(eng, warm, 72, temperature=1.0, seed=3)  # warm-up: graphs, and adaptive learns
        runs = [decode_run(eng, prompts, 72, temperature=1.0, seed=5) for _ in range(2)]
        best = max(runs, key=lambda r: r["tok_s"])
        out.append({"strategy": strat, "tok_s": best["tok_s"], "tok_s_runs": [r["tok_s"] for r in runs],
                    "accepted_per_step": best["accepted_per_step"], "steps": best["steps"],
                    "plain_frac": best["plain_frac"], "graphs": eng.graphs.summary()})
        b.res["tiny_world"] = out
        b.save()
    fixed = [r for r in out if r["strategy"] not in ("none", "adaptive")]
    best = max(fixed, key=lambda r: r["tok_s"])
    base = next(r for r in out if r["strategy"] == "none")
    ad = next(r for r in out if r["strategy"] == "adaptive")
    b.res["tiny_world_summary"] = {"best_fixed": best["strategy"], "adaptive_over_none": ad["tok_s"] / base["tok_s"],
                                   "adaptive_over_best_fixed": ad["tok_s"] / best["tok_s"],
                                   "best_fixed_over_none": best["tok_s"] / base["tok_s"]}


def section_head(b: Bench) -> None:
    """The EAGLE-style draft head (drafting.head) as the draft on the GPU path: greedy and seeded outputs equal plain
    decoding's for every strategy (graphs, device-side stages), and what an untrained head (the actor's last layer)
    accepts and costs per step on the tiny world."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drafting.model.head import DraftHead
    from trainer.tiny.bootstrap import world_at

    world = world_at(tiny_dir())
    tok = AutoTokenizer.from_pretrained(world.tokenizer_path)
    rows = [json.loads(line) for line in open(world.eval_prompts)]
    prompts = [tok(r["prompt"])["input_ids"] for r in rows[:16]]
    dt = torch.float32
    actor = AutoModelForCausalLM.from_pretrained(world.actor_path, dtype=dt).to(b.dev).eval()
    head = DraftHead.from_actor(actor).to(b.dev).eval()
    out, ref = [], {}
    for strat in ("none", "chain:3", "tree:3,2,6", "adaptive"):
        eng = SpeculativeEngine(actor, head, strategy=strat, max_slots=16, max_len=160, device=b.dev, dtype=dt,
                                eos_token_id=tok.eos_token_id,
                                calibration=tiny_calibration(actor, head, b.dev, dt) if strat == "adaptive" else None)
        row = {"strategy": strat}
        for temp in (0.0, 1.0):
            got = [o.token_ids for o in eng.generate(prompts, SamplingParams(temperature=temp, max_new_tokens=48,
                                                                             seed=7))]
            ref.setdefault(temp, got)
            row[f"equal_to_none_t{temp:g}_of_16"] = sum(a == r for a, r in zip(got, ref[temp]))
        decode_run(eng, prompts * 4, 48, temperature=1.0, seed=3)  # warm-up: graphs captured on second use
        run = decode_run(eng, prompts * 4, 48, temperature=1.0, seed=5)
        row.update({k: run.get(k) for k in ("tok_s", "accepted_per_step", "step_ms", "plain_frac")})
        out.append(row)
        b.res["head"] = out
        b.save()


# ---- rollout drafts --------------------------------------------------------------------------------------------
ROLLOUT_ROWS = ["none", "rollout_drafts", "chain:4", "chain:4+rollout_drafts", "adaptive", "adaptive+rollout_drafts"]
ROLLOUT_SAMPLES = 4  # a GRPO group: samples per prompt
HISTORY_SEED_OFFSET, WARM_SEED_OFFSET = 10**6, 2 * 10**6


def rollout_row_spec(name: str) -> dict:
    """A rollout row's engine: the draft model or none, the strategy, rollout drafts on or off."""
    base, rollout = name.split("+")[0], name.endswith("rollout_drafts")
    if base in ("none", "rollout_drafts"):
        return {"draft": False, "strategy": "none", "rollout": rollout}
    return {"draft": True, "strategy": base, "rollout": rollout}


def rollout_run(eng: SpeculativeEngine, prompts, live: int, new: int, seed: int, history=None,
                tag: str = "run") -> dict:
    """Every prompt x ROLLOUT_SAMPLES samples (group = prompt index, tagged by `tag` so that runs on one engine never
    draft from each other's samples), at most `live` in flight (the next request added as one finishes, as a rollout's
    queue feeds its slots), seeded sampling at temperature 1, to completion. `history`: prompt index -> earlier
    responses. Whole-rollout figures (admissions and prefills included, the same in every row)."""
    eng.reset_stats()
    eng.step_log.clear()
    pending = [(i, j) for i in range(len(prompts)) for j in range(ROLLOUT_SAMPLES)][::-1]
    done, inflight = {}, 0
    t0 = time.perf_counter()
    while pending or inflight:
        while pending and inflight < live:
            i, j = pending.pop()
            sp = SamplingParams(temperature=1.0, max_new_tokens=new, seed=seed + 1000 * i + j)
            eng.add(GenRequest((tag, i, j), list(prompts[i]), sp, group=(tag, i),
                               history=history.get(i) if history is not None else None))
            inflight += 1
        for o in eng.step():
            done[o.request_id[1:]] = list(o.token_ids)
            inflight -= 1
    wall = time.perf_counter() - t0
    log, st, rs = list(eng.step_log), eng.stats(), eng.rollout_summary()
    total = sum(s["t_total"] for s in log)
    tokens = sum(len(t) for t in done.values())
    step_ms = 1000 * total / max(len(log), 1)
    row = {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "steps": len(log), "step_ms": step_ms,
           "live_mean": sum(s["live"] for s in log) / max(len(log), 1),
           "mean_tokens_per_step": st.mean_tokens_per_step,
           "plain_frac": 1 - len([s for s in log if not s.get("plain")]) / max(len(log), 1),
           "chain_tokens_per_step": rs.get("chain_tokens_per_step", 0.0),
           "chains_per_step": rs.get("chains_per_step", 0.0),
           "lookup_ms_per_step": rs.get("lookup_ms_per_step", 0.0)}
    row["lookup_share"] = row["lookup_ms_per_step"] / step_ms if step_ms else 0.0
    for src in ("self", "sibling", "history"):
        if f"chain_tokens_per_step_{src}" in rs:
            row[f"chain_tokens_per_step_{src}"] = rs[f"chain_tokens_per_step_{src}"]
    row["outputs"] = done
    return row


def section_rollout_drafts(b: Bench) -> None:
    """Rollout drafts (chains looked up in the rollout itself: the sample's prompt and response, its GRPO group's
    siblings, earlier responses to the same prompt) on the tiny world, alone and in one tree with the draft model's
    nodes, at 1, 16 and 64 live samples (smoke: 1 and 4). live/4 prompts (at least one) x 4 samples, group = prompt;
    history = the responses of one earlier plain rollout of the same prompts with other seeds (seed offset), as the
    driver's HistoryStore hands them in. One engine per row, shared by the live counts (each run's groups its own);
    each run is preceded by a warm-up on the same prompts with other seeds (graphs captured, adaptive learns).
    `identical`: the row's tokens are plain decoding's (seeded sampling at temperature 1 is exact: all must be)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drafting.spec.suffix import HistoryStore, SuffixConfig
    from trainer.tiny.bootstrap import world_at

    world = world_at(tiny_dir())
    tok = AutoTokenizer.from_pretrained(world.tokenizer_path)
    with open(world.eval_prompts) as f:
        rows = [json.loads(line) for line in f]
    lives = [1, 4] if b.smoke else ([1, 64] if b.args.quick else [1, 16, 64])
    new, repeats, seed = (16, 1, 11) if b.smoke else (72, 2, 11)
    n_prompts = max(1, max(lives) // ROLLOUT_SAMPLES)
    prompts = [tok(r["prompt"])["input_ids"] for r in rows[:n_prompts]]
    dt = torch.float32
    actor = AutoModelForCausalLM.from_pretrained(world.actor_path, dtype=dt).to(b.dev).eval()
    draft = AutoModelForCausalLM.from_pretrained(world.draft_path, dtype=dt).to(b.dev).eval()
    t = time.perf_counter()
    cal = tiny_calibration(actor, draft, b.dev, dt)
    cal_s = time.perf_counter() - t
    cfg = SuffixConfig()
    engines = {}
    for name in ROLLOUT_ROWS:
        s = rollout_row_spec(name)
        engines[name] = SpeculativeEngine(actor, draft if s["draft"] else None, strategy=s["strategy"],
                                          max_slots=max(lives), max_len=160, device=b.dev, dtype=dt,
                                          eos_token_id=tok.eos_token_id,
                                          calibration=cal if s["strategy"] == "adaptive" else None,
                                          rollout_drafts=cfg if s["rollout"] else None)
    # history: one earlier plain rollout of every prompt (other seeds), kept as the driver's HistoryStore keeps it
    t = time.perf_counter()
    h = rollout_run(engines["none"], prompts, max(lives), new, seed + HISTORY_SEED_OFFSET, tag="history")
    store = HistoryStore(cfg)
    for (i, j), toks in sorted(h["outputs"].items()):
        store.add(i, toks)
    history = {i: store.get(i) for i in range(n_prompts)}
    out = {"config": {"lives": lives, "samples_per_prompt": ROLLOUT_SAMPLES, "max_new_tokens": new,
                      "temperature": 1.0, "repeats": repeats, "suffix": dataclasses.asdict(cfg),
                      "calibration_s": round(cal_s, 2)},
           "history": {"seed_offset": HISTORY_SEED_OFFSET, "responses_per_prompt": [len(v) for v in history.values()],
                       "tokens": h["tokens"], "seconds": round(time.perf_counter() - t, 2)},
           "table": []}
    b.res["rollout_drafts"] = out
    for L in lives:
        if not b.smoke and out["table"] and b.left() < 20:
            out["stopped"] = f"budget: {b.left():.0f} s left before live {L}"
            break
        ps = prompts[:max(1, L // ROLLOUT_SAMPLES)]
        ref = None
        for name in ROLLOUT_ROWS:
            eng = engines[name]
            rollout_run(eng, ps, L, new, seed + WARM_SEED_OFFSET, history, tag=f"warm{L}")
            runs = [rollout_run(eng, ps, L, new, seed, history, tag=f"live{L}.{k}") for k in range(repeats)]
            if ref is None:
                ref = runs[0]["outputs"]
            best = max(runs, key=lambda r: r["tok_s"])
            row = {"live": L, "row": name, **rollout_row_spec(name), "prompts": len(ps),
                   **{k: v for k, v in best.items() if k != "outputs"},
                   "tok_s_runs": [r["tok_s"] for r in runs],
                   "identical": all(r["outputs"] == ref for r in runs)}
            base = next((r for r in out["table"] if r["live"] == L and r["row"] == "none"), None)
            if base is not None:
                row["x_none_tok_s"] = row["tok_s"] / base["tok_s"]
            out["table"].append(row)
            b.save()
    out["all_identical"] = all(r["identical"] for r in out["table"])


def plot(res: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    table = res.get("speed_table")
    if not table:
        return None
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    lives = [r["live"] for r in table]
    plain = [1000 * r["live"] / r["none_step_ms"] for r in table]  # steady-state decode steps
    ax[0].plot(lives, [r["roofline_tok_s"] for r in table], marker="o", label="roofline")
    ax[0].plot(lives, plain, marker="o", label="engine, plain")
    if all("hf_generate_tok_s" in r for r in table):
        ax[0].plot(lives, [r["hf_generate_tok_s"] for r in table], marker="o", label="HF generate")
    ax[0].set(xscale="log", yscale="log", xlabel="live samples", ylabel="tokens / s", title="plain decoding")
    ax[0].legend()
    for name in STRATEGIES:
        if all(f"{name}_step_ms" in r for r in table):
            ax[1].plot(lives, [r[f"{name}_step_ms"] for r in table], marker="o", label=name)
    ax[1].set(xscale="log", xlabel="live samples", ylabel="ms per step", title="step cost by strategy")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return str(path)


# run order (importance), with the seconds of budget each needs to start
SECTIONS = [("env", section_env, 0), ("attention", section_attention, 20), ("speed", section_speed, 90),
            ("calibration", section_calibration, 40), ("adaptive", section_adaptive, 30),
            ("syncs", section_syncs, 20), ("correctness", section_correctness, 30),
            ("tiny", section_tiny, 30), ("rollout_drafts", section_rollout_drafts, 40), ("head", section_head, 30),
            ("eagle", section_eagle, 30), ("compile", section_compile, 40)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/gpu.json")
    ap.add_argument("--quick", action="store_true", help="live samples 1 and 64 only, a shorter tiny-world rollout")
    ap.add_argument("--smoke", action="store_true", help="CPU, small shapes: checks the script itself")
    ap.add_argument("--budget-s", type=float, default=470.0, help="stop starting sections after this long")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="the main runs with torch.compile'd norms, RoPE and activations (default: the engine's, on "
                         "for CUDA; the compile section compares both either way)")
    ap.add_argument("--only", default=None, help="comma-separated sections to run (default: all)")
    ap.add_argument("--kv-cache", default="paged", choices=("paged", "dense"),
                    help="the 8B world's K/V cache (run the speed section with each, in one call, to compare)")
    ap.add_argument("--plot", default=None, metavar="FILE.json", help="only redraw the PNG and print the table")
    args = ap.parse_args(argv)
    if args.plot:
        res = json.loads(Path(args.plot).read_text())
        print(plot(res, Path(args.plot).with_suffix(".png")))
        print(summary_table(res))
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print("bench.gpu needs a CUDA device (or --smoke for the CPU check)", file=sys.stderr)
        return 2
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    b = Bench(args)
    only = set(args.only.split(",")) if args.only else None
    for name, fn, need in SECTIONS:
        if only is None or name in only:
            b.section(name, fn, need)
    b.res["plot"] = plot(b.res, b.out.with_suffix(".png"))
    b.res["seconds"] = round(time.perf_counter() - b.t0, 1)
    b.save()
    print(summary_table(b.res))
    return 0


def summary_table(res: dict) -> str:
    lines = []
    for r in res.get("speed_table", []):
        plain = 1000 * r["live"] / r["none_step_ms"]  # steady-state decode steps
        lines.append(f"live {r['live']:>4}: plain {plain:8.0f} tok/s ({plain / r['roofline_tok_s']:.0%} of roofline "
                     f"{r['roofline_tok_s']:.0f}), x HF {plain / r.get('hf_generate_tok_s', float('nan')):.1f}; "
                     f"ms per step: none {r['none_step_ms']:.2f}"
                     + "".join(f", {n} {r[f'{n}_step_ms']:.2f}" for n in STRATEGIES[1:] if f"{n}_step_ms" in r))
    for r in res.get("forwards", []):
        lines.append(f"  {r['strategy']:<11} live {r['live']:>3} {r['forward']:<28} {r['ms']:7.3f} ms "
                     f"= {r['over_roofline']:.2f} x roofline")
    for r in res.get("kernels_and_syncs", []):
        lines.append(f"  syncs {r['strategy']:<24} live {r['live']:>3}: {r['host_syncs_per_step']:.1f} syncs, "
                     f"{r['kernels_per_step']:.0f} kernels, {r['graph_launches_per_step']:.1f} graph launches "
                     f"per step")
    for r in res.get("rollout_drafts", {}).get("table", []):
        lines.append(f"  rollout live {r['live']:>3} {r['row']:<24} {r['tok_s']:8.0f} tok/s "
                     f"(x{r.get('x_none_tok_s', 1.0):.2f} none), {r['step_ms']:6.2f} ms/step, "
                     f"{r['mean_tokens_per_step']:.2f} tok/step (chains {r['chain_tokens_per_step']:.2f}), "
                     f"lookup {r['lookup_ms_per_step']:.3f} ms ({r['lookup_share']:.1%})"
                     + ("" if r["identical"] else "  NOT IDENTICAL"))
    if res.get("errors"):
        lines.append(f"errors in: {', '.join(res['errors'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
