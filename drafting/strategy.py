"""Draft strategies: how deep to draft, how wide, and how many draft-tree nodes each sample verifies.

Node choice sits behind `DraftStrategy.choose` so an adaptive strategy (step-time model x acceptance
predictor) can replace the static ones without touching the engine."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftStrategy:
    """Static EAGLE-2 style draft tree: `depth` levels, top-`topk` children per expanded node, the `topk`
    best nodes of a level are expanded, then the top-`nodes` nodes by value are verified (at most the
    topk + (depth - 1) * topk^2 nodes drafted)."""

    name: str
    depth: int  # draft levels; 0 = plain autoregressive decoding
    topk: int  # children per expanded node and frontier width per level
    nodes: int  # draft nodes verified per sample

    def expand_more(self, level: int, frontier_values: torch.Tensor, live: int, context_len: int) -> bool:
        """Whether to draft level `level + 1` (levels counted from 1). frontier_values [B, topk]."""
        return level < self.depth

    def choose(self, tree_values: torch.Tensor, live: int, context_len: int) -> int | torch.Tensor:
        """Nodes to verify per sample: an int for all, or a [B] long tensor. tree_values [B, N]."""
        return min(self.nodes, tree_values.shape[1])

    @property
    def max_nodes(self) -> int:
        """Most draft nodes one sample can ever verify (sizes buffers)."""
        return self.nodes


def parse_strategy(spec: str | DraftStrategy) -> DraftStrategy:
    """'none' | 'chain:k' | 'tree:depth,topk,nodes' -> DraftStrategy; bad strings raise naming the string."""
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
    raise ValueError(f"strategy {spec!r} not understood: want 'none', 'chain:K' or 'tree:DEPTH,TOPK,NODES' "
                     f"with positive integers")
