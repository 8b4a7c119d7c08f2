"""The draft's verdict: can drafting pay on this hardware at the acceptance measured, and if not, what to do.

Drafting pays when a speculative step commits enough tokens to cover its cost. With a per-token acceptance a,
a chain of `depth` drafted tokens commits 1 + a + ... + a^depth tokens per sample-step on average; this
hardware's step-time model (drafting/calibration.py) prices the step. The best depth's committed tokens per
second over plain decoding's is the speed-up; the break-even acceptance is where it reaches PAYS. A tree gains
a little over a chain at the same acceptance, so the chain's figure is the conservative one. A pure module: the
driver and `trainer.distill_draft` both call it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DEPTHS = tuple(range(1, 9))
PAYS = 1.05  # a predicted gain under 5% is within the step-time model's error: not worth drafting for


def committed_per_step(acceptance: float, depth: int) -> float:
    """Expected tokens a sample commits per speculative step: the accepted drafts plus the target's own token."""
    a = min(max(acceptance, 0.0), 1.0)
    return float(sum(a ** i for i in range(depth + 1)))


def speedup(cal, acceptance: float, live: int, ctx: int) -> tuple[float, int]:
    """The best chain's (speed-up over plain decoding, depth) at `live` samples of context `ctx` under the
    calibration's step-time model (plain_ms, root_ms, level_ms, verify_ms)."""
    plain_rate = 1.0 / cal.plain_ms(live, ctx)  # tokens per sample per ms
    best = (0.0, 0)
    for depth in DEPTHS:  # the root's forward drafts the first token, each further level one more
        ms = (cal.root_ms(live, 2, ctx) + (depth - 1) * cal.level_ms(live, 1, ctx)
              + float(cal.verify_ms(live, [live * (1 + depth)], [1 + depth], ctx)[0]))
        ratio = committed_per_step(acceptance, depth) / ms / plain_rate
        if ratio > best[0]:
            best = (ratio, depth)
    return best


def break_even(cal, live: int, ctx: int, hi: float = 0.99) -> float | None:
    """The lowest acceptance at which drafting pays (speed-up >= PAYS), or None when even `hi` does not."""
    if speedup(cal, hi, live, ctx)[0] < PAYS:
        return None
    lo = 0.0
    for _ in range(20):  # the speed-up grows with the acceptance: bisect
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if speedup(cal, mid, live, ctx)[0] >= PAYS else (mid, hi)
    return hi


@dataclass(frozen=True)
class Verdict:
    acceptance: float  # per drafted token, measured
    live: int
    ctx: int
    speedup: float = math.nan  # the best shape's, predicted; nan without a calibration
    depth: int = 0
    break_even: float | None = None  # None: no acceptance pays (or no calibration)
    calibrated: bool = False
    bound: float = math.nan  # without a calibration: the most drafting can gain on any hardware (upper_bound)

    @property
    def pays(self) -> bool:
        return self.calibrated and self.speedup >= PAYS

    @property
    def advice(self) -> str:
        if not self.calibrated and self.bound < 1.0:
            return ("decode plain (generation.strategy=none), or train the draft longer, or use another kind of "
                    "draft (fewer layers, or a head)")
        if not self.calibrated:
            return ("no step-time calibration of this model pair here: profile it (python -m drafting.profile) "
                    "for a speed verdict")
        if self.pays:
            return "keep drafting (generation.strategy=adaptive)"
        if self.break_even is None:
            return ("decode plain (generation.strategy=none); this draft is too slow beside this target for any "
                    "acceptance: use another kind of draft (fewer layers, or a head)")
        if self.break_even > 0.9:
            return (f"decode plain (generation.strategy=none), or use another kind of draft: it needs acceptance "
                    f">= {self.break_even:.2f}")
        return (f"decode plain (generation.strategy=none), or train the draft longer: it needs acceptance "
                f">= {self.break_even:.2f}")

    def line(self) -> str:
        """One console line: the number, what it means for speed here, what to do."""
        head = f"draft verdict: acceptance {self.acceptance:.2f} per drafted token"
        if not self.calibrated and self.bound < 1.0:
            return f"{head}: drafting cannot pay on any hardware (at most x{self.bound:.2f}) -> {self.advice}"
        if not self.calibrated:
            bound = "" if math.isnan(self.bound) else f" (at most x{self.bound:.2f} on ideal hardware)"
            return f"{head}{bound}; {self.advice}"
        shape = f"chain of {self.depth}"
        where = f"{self.live} live samples, context {self.ctx}"
        if self.pays:
            return f"{head}: drafting pays x{self.speedup:.2f} ({shape}, {where}) -> {self.advice}"
        return f"{head}: drafting cannot pay (best x{self.speedup:.2f}, {shape}, {where}) -> {self.advice}"

    def metrics(self, prefix: str = "draft/verdict_") -> dict[str, float]:
        out = {f"{prefix}acceptance": self.acceptance}
        if not math.isnan(self.bound):
            out[f"{prefix}bound"] = self.bound
        if self.calibrated:
            out.update({f"{prefix}speedup": self.speedup, f"{prefix}pays": float(self.pays),
                        f"{prefix}break_even": math.nan if self.break_even is None else self.break_even})
        return out


def judge(acceptance: float, cal=None, live: int = 16, ctx: int = 128, cost_ratio: float | None = None) -> Verdict:
    """The verdict on a draft of this measured acceptance. Without a calibration, the hardware-free bound when the
    draft's cost per token relative to the target's is given (`forward_cost`), else only the number."""
    live, ctx = max(int(live), 1), max(int(ctx), 1)
    if cal is None:
        bound = math.nan if cost_ratio is None else upper_bound(acceptance, cost_ratio)
        return Verdict(acceptance, live, ctx, bound=bound)
    gain, depth = speedup(cal, acceptance, live, ctx)
    return Verdict(acceptance, live, ctx, gain, depth, break_even(cal, live, ctx), calibrated=True)


def find_calibration(actor_path: str, draft_path: str, dtype: str = "float32", device: str = "cpu",
                     threads: int = 1, spec: str | None = "auto"):
    """This pair's calibration when one exists (the file `spec` names, or with 'auto' the profile cached for this
    pair, dtype, device and threads); None otherwise. A verdict never profiles: that takes minutes."""
    from pathlib import Path

    from transformers import AutoConfig

    from drafting.policy.calibration import CalibrationError, calibration_key, key_name, load_calibration
    from drafting.policy.calibration import cache_dir

    if not spec:
        return None
    from drafting.model.head import draft_config

    actor = AutoConfig.from_pretrained(actor_path)
    key = calibration_key(actor, draft_config(draft_path, actor), dtype, device, threads)
    path = cache_dir() / f"{key_name(key)}.json" if str(spec) == "auto" else Path(spec)
    try:
        return load_calibration(path, key) if path.is_file() else None
    except CalibrationError as e:
        print(f"draft verdict: {e}", flush=True)
        return None


# --- without a calibration: a bound that needs no profile ----------------------------------------------------
def forward_cost(config) -> float:
    """Multiply-adds per token of a decoder (its layers' matmuls and the LM head), from its HF config."""
    h, f, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or h // heads
    attention = h * d * (2 * heads + 2 * kv)  # q, o and k, v projections
    return float(n * (attention + 3 * h * f) + h * config.vocab_size)


def upper_bound(acceptance: float, cost_ratio: float) -> float:
    """The most drafting can gain on any hardware: a chain's committed tokens over a step that costs a plain step
    (verifying is never cheaper) plus one draft forward per drafted token at `cost_ratio` of the target's."""
    return max(committed_per_step(acceptance, d) / (1.0 + d * cost_ratio) for d in DEPTHS)


def distilled_acceptance(draft_path) -> float | None:
    """The held-out acceptance `trainer.distill_draft` recorded for this draft (DRAFT/distill.json, its last
    epoch), or None when the draft has no such record."""
    import json
    from pathlib import Path

    record = Path(draft_path) / "distill.json"
    try:
        return float(json.loads(record.read_text())["history"][-1]["acceptance"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
