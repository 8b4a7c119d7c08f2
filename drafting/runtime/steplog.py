"""Summaries of the engine's per-step log (one dict per step: live samples, context, plain or drafted, levels,
chosen nodes, predicted and realised accepted tokens, phase timings). One place reads the log, so the tracker
and the benchmarks agree on what a figure means."""
from __future__ import annotations

from typing import Iterable


def summarize(steps: Iterable[dict]) -> dict:
    """Per-rollout figures: sums over steps, then ratios (per sample-step where it says so)."""
    steps = list(steps)
    if not steps:
        return {}
    sample_steps = sum(s["live"] for s in steps)
    drafted = [s for s in steps if not s.get("plain")]
    total = sum(s["t_total"] for s in steps)
    out = {
        "steps": len(steps),
        "plain_frac": 1.0 - len(drafted) / len(steps),
        "live_mean": sample_steps / len(steps),
        "nodes_per_sample_step": sum(s["nodes"] for s in steps) / sample_steps,
        "levels_mean": sum(s["levels"] for s in drafted) / max(len(drafted), 1),
        "accepted_per_sample_step": sum(s["accepted"] for s in steps) / sample_steps,
        "step_ms": 1000.0 * total / len(steps),
        "selection_overhead_frac": sum(s.get("t_policy", 0.0) for s in steps) / max(total, 1e-12),
    }
    predicted = [s for s in drafted if "plan_predicted_accepted" in s]
    if predicted:
        out["predicted_accepted_per_sample_step"] = (sum(s["plan_predicted_accepted"] for s in predicted)
                                                     / sum(s["live"] for s in predicted))
        out["realised_accepted_per_sample_step"] = (sum(s["accepted"] for s in predicted)
                                                    / sum(s["live"] for s in predicted))
    return out
