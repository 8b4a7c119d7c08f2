"""Where a step's time goes, kept out of the algorithm's lines: `with timer.host("policy"):` adds host seconds to
the step log's `t_policy`; `with timer.stage("verify"):` marks a stage on the stage clock (CUDA events on a GPU,
read only after the step's one sync; the host clock on CPU) and `resolve` turns the marks into `t_root`,
`t_levels` (a list, made by the step when it drafts), `t_verify` or `t_plain`."""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class StageClock:
    """Stage timings: CUDA events on a GPU (read after the step's one sync), the host clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a


class StepTimer:
    """One step's timings, into its log entry (`log`). With no clock (a step replayed by `bench.simulate`, whose
    stages report modelled time) it records nothing."""

    def __init__(self, clock: StageClock | None):
        self.clock = clock
        self.t0 = time.perf_counter()
        self.log: dict = {"t_policy": 0.0}
        self.marks: list[tuple[str, object, object]] = []

    @contextmanager
    def host(self, name: str):
        if self.clock is None:  # a replayed step (bench.simulate): only modelled time counts
            yield
            return
        t = time.perf_counter()
        try:
            yield
        finally:
            key = f"t_{name}"
            self.log[key] = self.log.get(key, 0.0) + time.perf_counter() - t

    @contextmanager
    def stage(self, name: str):
        if self.clock is None:
            yield
            return
        a = self.clock.mark()
        try:
            yield
        finally:
            self.marks.append((name, a, self.clock.mark()))

    def resolve(self) -> None:
        """The stage marks as seconds (after the step's sync: CUDA events are complete by then)."""
        for name, a, b in self.marks:
            if name == "level":
                self.log["t_levels"].append(self.clock.seconds(a, b))
            else:
                self.log[f"t_{name}"] = self.clock.seconds(a, b)
        self.marks = []

    def total(self) -> float:
        self.log["t_total"] = time.perf_counter() - self.t0
        return self.log["t_total"]
