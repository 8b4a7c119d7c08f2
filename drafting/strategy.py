"""Draft strategies: whether to draft this step, how deep, and which drafted nodes each sample verifies.

The engine asks three questions per step (`plan`, `deeper`, `select`) and reports what happened
(`observe`); a static strategy answers from its fixed shape, the adaptive one (`drafting.adaptive`) from a
step-time model and an acceptance predictor. The choice changes speed only: emitted tokens never depend on it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from drafting.tree import DraftTree, top_per_sample


@dataclass
class StepView:
    """What a strategy sees of the batch before a step."""

    live: int
    context: int  # max committed length of the live samples
    draft_lag: int  # max tokens the draft cache has yet to catch up on
    temperature: torch.Tensor  # [B]


@dataclass
class DraftStrategy:
    """Static EAGLE-2 style tree: `depth` levels, `topk` children per expanded node, the `width` best nodes of
    a level are expanded, then each sample verifies its `nodes` best nodes by draft value."""

    name: str
    depth: int  # draft levels; 0 = plain autoregressive decoding
    topk: int  # children per expanded node
    nodes: int  # draft nodes verified per sample
    width: int = 0  # frontier nodes expanded per level (0: topk)

    def __post_init__(self):
        self.width = self.width or self.topk

    @property
    def max_depth(self) -> int:
        return self.depth

    @property
    def max_width(self) -> int:
        return self.width

    def plan(self, view: StepView) -> bool:
        """Draft this step (True) or take a plain step that skips the draft model (False)."""
        return self.depth > 0

    def score(self, tree: DraftTree, view: StepView) -> None:
        """Called after each drafted level: set `tree.score` of the new nodes (static: their draft value)."""

    def deeper(self, tree: DraftTree, view: StepView) -> bool:
        """Draft one more level on top of `tree`."""
        return tree.levels < self.depth

    def select(self, tree: DraftTree, view: StepView) -> torch.Tensor:
        """[B, N] bool: nodes to verify (the engine closes the set under ancestors)."""
        return top_per_sample(tree.value, self.nodes)

    def observe(self, record: dict) -> None:
        """What the step did (features of tested nodes, accepted flags, timings); static strategies ignore it."""

    def step_done(self, log: dict) -> None:
        """The finished step's log entry (timings, accepted tokens); static strategies ignore it."""

    def reset(self) -> None:
        """The draft's weights changed; static strategies keep nothing about it."""


def parse_strategy(spec: str | DraftStrategy) -> DraftStrategy:
    """'none' | 'chain:k' | 'tree:depth,topk,nodes' -> DraftStrategy; bad strings raise naming the string.
    ('adaptive' is built by the engine, which owns the calibration it needs.)"""
    if isinstance(spec, DraftStrategy):
        return spec
    s = str(spec).strip().lower()
    if s == "none":
        return DraftStrategy("none", 0, 1, 0)
    kind, _, args = s.partition(":")
    nums = [int(a) if a.strip().isdigit() else -1 for a in args.split(",")] if args else []
    if kind == "chain" and len(nums) == 1 and nums[0] >= 1:
        return DraftStrategy(s, nums[0], 1, nums[0])
    if kind == "tree" and len(nums) == 3 and all(n >= 1 for n in nums):
        return DraftStrategy(s, *nums)
    raise ValueError(f"strategy {spec!r} not understood: want 'none', 'adaptive', 'chain:K' or "
                     f"'tree:DEPTH,TOPK,NODES' with positive integers")
