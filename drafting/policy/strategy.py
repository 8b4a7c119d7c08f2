"""Draft strategies: whether to draft this step, how deep, and which drafted nodes each sample verifies.

Two ways to answer. A strategy with `host_decisions` is asked three questions per step (`plan`, `deeper`,
`select`) and reads the drafted tree between levels. Any other strategy answers once per step, before it
starts (`plan_shape`: levels, width, nodes per sample), and ranks nodes on the device (`score_nodes`), so a
step needs no host reads and runs as CUDA graphs. A static strategy answers from its fixed shape, the adaptive
one (`drafting.adaptive`) from a step-time model and an acceptance predictor. Both report what happened
(`observe`, `step_done`). The choice changes speed only: emitted tokens never depend on it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from drafting.spec.tree import DraftTree, top_per_sample


@dataclass
class StepView:
    """What a strategy sees of the batch before a step."""

    live: int
    context: int  # max committed length of the live samples
    draft_lag: int  # max tokens the draft cache has yet to catch up on
    temperature: torch.Tensor  # [B]
    node_cap: int = 1 << 30  # tree nodes per sample the K/V memory has room for this step
    chains: int = 0  # live samples with a rollout chain this step (`drafting.runtime.rollout_drafts`)
    chain_score: np.ndarray | None = None  # [B, chain depth] its nodes' predicted path acceptance (0: no node)
    chain_max: int = 0  # the longest of this step's chains
    chain_tokens: np.ndarray | None = None  # [B, chain depth] their tokens (past a row's chain: 0)


@dataclass(frozen=True)
class StepShape:
    """A drafting step fixed before it starts: every stage's shape follows from it."""

    levels: int  # draft levels, >= 1
    width: int  # frontier nodes expanded per level after the first
    nodes: int  # nodes verified per sample (the best by score; fewer when the tree is smaller)


@dataclass
class DraftStrategy:
    """Static EAGLE-2 style tree: `depth` levels, `topk` children per expanded node, the `width` best nodes of
    a level are expanded, then each sample verifies its `nodes` best nodes by draft value."""

    name: str
    depth: int  # draft levels; 0 = plain autoregressive decoding
    topk: int  # children per expanded node
    nodes: int  # draft nodes verified per sample
    width: int = 0  # frontier nodes expanded per level (0: topk)

    host_decisions = False  # True: plan/deeper/select each step, reading the tree between levels
    kind = "static"  # part of every stage's graph key: what the strategy computes inside the stages

    def __post_init__(self):
        self.width = self.width or self.topk

    @property
    def pool(self) -> int:
        """The most nodes one sample's tree can hold."""
        return self.topk + max(self.max_depth - 1, 0) * self.max_width * self.topk

    @property
    def max_depth(self) -> int:
        return self.depth

    @property
    def max_width(self) -> int:
        return self.width

    def plan(self, view: StepView) -> bool:
        """Draft this step (True) or take a plain step that skips the draft model (False)."""
        return self.depth > 0

    def plan_shape(self, view: StepView) -> StepShape | None:
        """The whole step's shape, or None for a plain step (strategies without host decisions)."""
        if self.depth > 0:
            return StepShape(self.depth, self.width, self.nodes)
        return StepShape(0, 0, 0) if view.chains else None  # rollout chains alone, where there are any

    def score_nodes(self, drafter, B: int, lo: int, hi: int, temperature: torch.Tensor) -> None:
        """On the device, inside a stage: set the score of nodes [lo, hi) of rows 0..B-1 in the drafter's buffers
        (static: their draft value, which the drafter already wrote)."""

    def summarize(self, tree: DraftTree, vt, acc, live: torch.Tensor, levels: int) -> None:
        """On the device, inside the verify stage: whatever the strategy learns from a verified tree (live [B]
        bool: rows that hold a sample; levels: the tree's depth)."""

    def fetch_async(self) -> None:
        """Start copying what `summarize` wrote to the host (the engine waits once, for everything)."""

    def wants_records(self) -> bool:
        """Whether the engine should bring this step's node records back for `observe`."""
        return False

    def score(self, tree: DraftTree, view: StepView) -> None:
        """Called after each drafted level: set `tree.score` of the new nodes (static: their draft value)."""

    def deeper(self, tree: DraftTree, view: StepView) -> bool:
        """Draft one more level on top of `tree`."""
        return tree.levels < self.depth

    def next_width(self, view: StepView, shape: StepShape | None, levels: int, newest: int, tree_of) -> int:
        """How many of the newest level's nodes to expand into one more level; 0: stop drafting. With host
        decisions the strategy scores the tree so far (`tree_of()`, built only then) and decides; otherwise the
        step's fixed `shape` does. The engine's level loop and bench.simulate's both ask this."""
        if self.host_decisions:
            tree = tree_of()
            self.score(tree, view)
            return min(self.width, newest) if self.deeper(tree, view) else 0
        return min(shape.width, newest) if levels < shape.levels else 0

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
