"""The step's stage backend on this engine's device: each spec stage (`drafting.spec.stages`) as one `graphs.run`
call, over the live rows rounded up to a graph bucket, with attention bounded to the columns the rows need (all of
them under a graph, whose shapes are fixed at capture). With host decisions the policy reads the tree between
levels, so the drafting stages stay eager; otherwise the step's shape is fixed before it starts and every stage
can be a graph."""
from __future__ import annotations

import torch

from drafting.policy.strategy import DraftStrategy, StepShape, StepView, parse_strategy
from drafting.runtime.graphs import GraphRunner, batch_bucket, pow2_bucket
from drafting.runtime.slots import Slots
from drafting.spec.stages import Stages
from drafting.spec.tree import DraftTree, close_under_ancestors

MIN_SCRATCH = 64  # cache columns past max_len for a step's tree nodes (and catch-up widths a graph covers)


def scratch_columns(strategy: str | DraftStrategy) -> int:
    """Cache columns past max_len for a step's tree nodes that an engine built with this strategy keeps (node i
    of a sample's tree sits at its committed length + i): the strategy's most nodes, at least MIN_SCRATCH."""
    s = None if isinstance(strategy, str) and strategy.strip().lower() == "adaptive" else parse_strategy(strategy)
    return max(MIN_SCRATCH, s.pool + 1 if s is not None and s.max_depth else 0)


class DeviceStages:
    """Runs `stages` for the rows `slots` holds, under `policy` (set with the strategy)."""

    def __init__(self, stages: Stages, slots: Slots, graphs: GraphRunner):
        self.stages, self.slots, self.graphs = stages, slots, graphs
        self.policy: DraftStrategy | None = None

    @property
    def chain(self) -> int:
        """Nodes a rollout chain takes at the front of every tree (0: rollout drafts off)."""
        return self.stages.chain

    def _rows(self, B: int) -> tuple[int, bool]:
        """Rows a stage runs over and whether it runs as a graph: graphs cover a bucket of rows."""
        graphed = self.graphs.enabled and not self.policy.host_decisions
        return batch_bucket(B, self.slots.max_slots, graphed), graphed

    def _kv_len(self, needed: int, graphed: bool) -> int:
        """Columns attention may read: all of them under a graph (the Triton kernel still reads each row only to its
        own length), what the rows need when eager."""
        columns = self.stages.tcache.columns
        return columns if graphed else min(max(needed, 1), columns)

    def plain(self, view: StepView) -> None:
        B, graphed = batch_bucket(view.live, self.slots.max_slots, self.graphs.enabled), self.graphs.enabled
        self.graphs.run(self.stages.plain, B, self._kv_len(view.context, graphed), self.slots.flags(),
                        capturable=graphed)

    def root(self, view: StepView, k: int) -> None:
        Bb, graphed = self._rows(view.live)
        h, B, lag = self.slots.h, view.live, view.draft_lag
        fits = lag <= MIN_SCRATCH  # catch-up widths a graph covers
        W = pow2_bucket(lag) if graphed and fits else lag
        kv_len = self._kv_len(int((h["dlen"][:B] + W).max()), graphed and fits)
        self.graphs.run(self.stages.root, Bb, W, kv_len, k, self.slots.flags(), self.policy.kind, view.chains > 0,
                        capturable=graphed and fits)
        if k:  # (a rollout chain alone leaves the draft behind, as a plain step does)
            h["dlen"][:B] = h["n"][:B]

    def level(self, view: StepView, size: int, newest: int, levels: int, width: int, k: int) -> None:
        Bb, graphed = self._rows(view.live)
        self.graphs.run(self.stages.level, Bb, size, newest, levels, width, k,
                        self._kv_len(view.context + size, graphed), self.slots.flags(), self.policy.kind,
                        capturable=graphed)

    def tree(self, B: int, size: int) -> DraftTree:
        return self.stages.drafter.view(B, size)

    def choose(self, view: StepView, selected: torch.Tensor, size: int) -> torch.Tensor:
        """The host's selection closed under ancestors, into the verify stage's buffer; nodes per row [B]."""
        chosen = close_under_ancestors(self.tree(view.live, size), selected)
        self.stages.chosen[:view.live, :size] = chosen
        return chosen.sum(1)

    def verify(self, view: StepView, counts: torch.Tensor | None, shape: StepShape | bool, size: int,
               levels: int) -> tuple[int, int, int]:
        """counts: the host's nodes per row (None on the device path: each row verifies its best shape.nodes).
        Returns (tokens a row may emit, the verify's width, nodes verified)."""
        Bb, graphed = self._rows(view.live)
        host, D = counts is not None, self.stages.chain
        if host:
            T = 1 + int(counts.max())
        elif self.policy.kind == "static":  # its best shape.nodes model nodes and the whole chain (the longest row's)
            T = 1 + min(shape.nodes, size - D) + min(view.chain_max, D)
        else:
            T = 1 + min(shape.nodes, size)
        # on the device path the verify sees every node slot (the tree's size is on the device), so its graph
        # depends on (rows, width) only, not on the tree's shape
        depth = max(levels if host else self.policy.max_depth, D)
        self.graphs.run(self.stages.verify, Bb, T, size if host else None, depth, self.policy.topk,
                        self._kv_len(view.context - 1 + T, graphed), self.slots.flags(), self.policy.kind,
                        view.chains > 0, capturable=graphed)
        return depth + 1, T, int(counts.sum()) if host else view.live * (T - 1)
