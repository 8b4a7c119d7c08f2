"""CUDA-graph runner for the engine's step stages (SGLang's and vLLM's graph runners, in small).

A stage is a function with no result that reads and writes preallocated buffers (`drafting.spec.stages`); its
arguments (rows rounded up to a bucket, tokens per row, tree size, sampling flags, ...) fix its shapes, and the
graph's key is built from them (`StageKey`): a key cannot leave out a shape argument. The first call of a key
runs eagerly (the warm-up: lazy initialisation, Triton and torch.compile builds happen
there), the second captures it into a graph in one shared memory pool, and every call after that replays it:
one launch instead of thousands. On CPU, or with graphs off, every call is the eager call."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def batch_bucket(live: int, max_slots: int, graphs: bool) -> int:
    """Rows a stage runs over: the live rows exactly when eager; on graphs the next bucket (the rows beyond
    the live ones are inert free slots)."""
    if not graphs:
        return live
    for b in BATCH_BUCKETS:
        if b >= live:
            return min(b, max_slots)
    return max_slots if live <= max_slots else live


def pow2_bucket(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


@dataclass(frozen=True)
class StageKey:
    """A captured graph's identity: the stage and every argument it was called with (all hashable)."""

    stage: str
    args: tuple


class GraphRunner:
    def __init__(self, device: torch.device, enabled: bool, max_graphs: int = 512):
        self.enabled = enabled and device.type == "cuda"
        self.device = device
        self.graphs: dict[StageKey, torch.cuda.CUDAGraph] = {}
        self.seen: set = set()
        self.max_graphs = max_graphs
        self.capture_s = 0.0  # time spent capturing
        self.memory = 0  # bytes the captures added to the device's reserved memory
        self.replays = self.eager = 0
        if self.enabled:
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream(device)

    def run(self, stage: Callable[..., None], *args: Hashable, capturable: bool = True) -> None:
        """stage(*args), replayed from its graph when one is captured for these arguments."""
        if not (self.enabled and capturable):
            self.eager += 1
            stage(*args)
            return
        key = StageKey(stage.__name__, args)
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self.seen or len(self.graphs) >= self.max_graphs:
                self.seen.add(key)
                self.eager += 1
                stage(*args)  # the first call is the warm-up, and does this step's work
                return
            graph = self._capture(lambda: stage(*args))
            self.graphs[key] = graph
        graph.replay()
        self.replays += 1

    def _capture(self, stage: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """Record the stage (nothing runs while recording; the caller replays it once for this call). Captured
        on a side stream into the shared pool, without `torch.cuda.graph`'s garbage collection and cache
        emptying, which cost more than the capture itself when hundreds of graphs are made."""
        t0 = time.perf_counter()
        before = torch.cuda.memory_reserved(self.device)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.stream(self.stream):
            graph.capture_begin(pool=self.pool)
            try:
                stage()
            finally:
                graph.capture_end()
        torch.cuda.synchronize(self.device)
        self.memory += torch.cuda.memory_reserved(self.device) - before
        self.capture_s += time.perf_counter() - t0
        return graph

    def summary(self) -> dict:
        return {"graphs": len(self.graphs), "capture_s": round(self.capture_s, 3),
                "capture_memory_mb": round(self.memory / 2**20, 1), "replays": self.replays, "eager": self.eager}
