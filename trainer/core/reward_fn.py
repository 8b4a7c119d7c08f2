"""Reward functions given as Python files (`trainer.reward_fn: path/to/file.py:function_name`), called with
Verl's signature `compute_score(data_source, solution_str, ground_truth, extra_info)`.

A function returns a float, or a dict with a `score` key whose other numeric keys become metrics
(`score/<key>`; non-numeric ones, such as Verl's `pred` strings, are ignored). Every failure is a
RewardFnError of one line naming the function, the sample's file and row, and the cause.
"""
from __future__ import annotations

import importlib.util
import math
import numbers
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

DEFAULT_NAME = "compute_score"  # Verl's default function name when the spec gives none


class RewardFnError(ValueError):
    """The reward function cannot be loaded, raised on a sample, or returned something that is not a score."""


@dataclass
class FnScores:
    """What a reward function said about a batch: its score per sample and the other numeric keys it returned."""
    scores: list[float]
    extra: dict[str, list[float | None]] = field(default_factory=dict)  # key -> per sample (None: not returned)

    def select(self, rows: slice) -> "FnScores":
        return FnScores(self.scores[rows], {k: v[rows] for k, v in self.extra.items()})

    def metrics(self, prefix: str, mean_name: str) -> dict[str, float]:
        """prefix + mean_name: the mean score; prefix + key: the mean of each extra key over the samples with it."""
        out = {prefix + mean_name: sum(self.scores) / max(len(self.scores), 1)}
        for key, values in self.extra.items():
            given = [v for v in values if v is not None]
            if given:
                out[prefix + key] = sum(given) / len(given)
        return out

    def by_source(self, data_sources: list[str], prefix: str) -> dict[str, float]:
        """prefix + <data_source>/score for each data source, when the batch mixes several (Verl's per-source view)."""
        groups: dict[str, list[float]] = {}
        for source, score in zip(data_sources, self.scores, strict=True):
            groups.setdefault(source, []).append(score)
        return {f"{prefix}{s}/score": sum(v) / len(v) for s, v in groups.items()} if len(groups) > 1 else {}


@dataclass
class RewardFn:
    """A loaded reward function and the "file.py:name" it came from (every error names it)."""
    fn: Callable
    spec: str


def split_spec(spec: str) -> tuple[Path, str]:
    """"dir/file.py:name" -> (path, name); without ":name" the name is Verl's default."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py"):
        path, name = spec, DEFAULT_NAME
    return Path(path).expanduser(), name


def load_reward_fn(spec: str) -> RewardFn:
    """The function named by "path/to/file.py:function_name" (relative paths from the working directory)."""
    path, name = split_spec(spec)
    if not path.is_file():
        raise RewardFnError(f"trainer.reward_fn: file not found: {path}")
    module_name = f"rlhfspec_reward_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # before running it, as importlib asks (dataclasses in the file need it)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file: one line naming it and the cause
        del sys.modules[module_name]
        raise RewardFnError(f"trainer.reward_fn: cannot import {path}: {_one_line(e)}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module_name)
        raise RewardFnError(f"trainer.reward_fn: {path} has no function {name!r} (functions: {', '.join(found)})")
    return RewardFn(fn, f"{path}:{name}")


def score_samples(reward: RewardFn, prompts: Sequence, responses: Sequence[str]) -> FnScores:
    """Call the function on every (prompt, response) as Verl does; `prompts` are trainer.data.Prompt."""
    fn, spec = reward.fn, reward.spec
    out = FnScores([])
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        where = f"sample {i} ({prompt.where})"
        try:
            result = fn(data_source=prompt.data_source, solution_str=response, ground_truth=prompt.ground_truth,
                        extra_info=prompt.extra_info)
        except Exception as e:  # noqa: BLE001 - the user's function: one line naming the sample and the cause
            raise RewardFnError(f"{spec} raised on {where}: {_one_line(e)}") from None
        extra = {}
        if isinstance(result, dict):
            if "score" not in result:
                raise RewardFnError(f"{spec} returned a dict without a 'score' key on {where} "
                                    f"(keys: {', '.join(map(str, result))})")
            extra = {k: float(v) for k, v in result.items() if k != "score" and _is_number(v)}
            result = result["score"]
        if not _is_number(result) or not math.isfinite(float(result)):
            raise RewardFnError(f"{spec} returned {result!r} ({type(result).__name__}) on {where}; "
                                "expected a finite float or a dict with a 'score' key")
        out.scores.append(float(result))
        for k, v in extra.items():
            out.extra.setdefault(k, [None] * i).append(v)
        for values in out.extra.values():
            if len(values) == i:  # this sample's dict did not have the key
                values.append(None)
    return out


def _one_line(e: Exception) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real)  # int, float, bool and numpy's scalars


def dry_run(spec: str, prompts: Sequence) -> str:
    """Load the function and score each prompt's ground truth as its response: a function that cannot score
    these rows stops the run before any actor starts. Returns the line to print."""
    fn = load_reward_fn(spec)
    try:
        result = score_samples(fn, prompts, [str(p.ground_truth) for p in prompts])
    except RewardFnError as e:
        raise RewardFnError(f"{e} (dry run at start-up: the ground truth as the response)") from None
    mean = sum(result.scores) / max(len(result.scores), 1)
    return f"reward_fn {spec}: the ground truth as the response scores {mean:.3f} on {len(prompts)} prompts"
