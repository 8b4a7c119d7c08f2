"""Calibration on first use inside a run: `calibration: auto` resolved to this model pair's cached profile, or
profiled now. `resolve_calibration` profiles at once (a file lock, so that instances starting together profile
once); `FirstUse` lets the engine decode with a fallback strategy while the profile runs in slices between its
steps, on a second engine that shares the weights, and switches the strategy when it lands."""
from __future__ import annotations

import fcntl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from drafting.calibrate.profile import DEFAULT_BUDGET_S, ProfileRun, quality_line
from drafting.policy.calibration import Calibration, as_calibration, cache_dir, key_name, load_calibration
from drafting.runtime.engine import Engine


def default_budget_s(device) -> float:
    return DEFAULT_BUDGET_S["cuda" if torch.device(device).type == "cuda" else "cpu"]


def resolve_budget(budget_s: float | None, device) -> float | None:
    """None: the device's default; 0: no budget (the full grid, however long it takes)."""
    if budget_s is None:
        return default_budget_s(device)
    if budget_s < 0:
        raise ValueError(f"profile budget: {budget_s} s must be >= 0 (0 = the full grid)")
    return float(budget_s) or None


def profile_needed(strategy: str, calibration) -> bool:
    """Only `adaptive` reads a step-time model; with calibration 'auto' it may have to profile on first use.
    (A static strategy, or none, never profiles; the balancer's threshold `auto` reads a profile if there is one.)"""
    return str(strategy).strip().lower() == "adaptive" and str(calibration) == "auto"


def _say(line: str) -> None:
    print(line, flush=True)


def resolve_calibration(engine, spec, budget_s: float | None = None) -> Calibration:
    """spec: a Calibration, a file path, or 'auto' (this pair's cached file here; profiled on first use within
    the budget (None: the device's default), with a lock so that instances starting together profile once)."""
    key = engine.calibration_key()
    if isinstance(spec, Calibration) or str(spec) != "auto":
        return as_calibration(spec, key)
    path = cache_dir() / f"{key_name(key)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return load_calibration(path, key)
        budget = resolve_budget(budget_s, engine.device)
        _say(f"calibration: profiling this model pair on first use (budget {budget or 0:.0f} s) -> {path}")
        cal = ProfileRun(engine, budget, report=_say).run()
        cal.save(path)
        _say(quality_line(cal))
        return cal


@dataclass
class FirstUse:
    """Calibration 'auto' and no profile of this pair here yet: the engine decodes with `fallback` while the pair
    is profiled in slices between its steps (`advance`, on a second engine sharing the weights); `finish` then
    switches the engine to `strategy`. One process profiles a pair (a file lock); the others wait for its file,
    and take the profile over if its process dies."""

    engine: object
    strategy: str
    fallback: str
    budget_s: float | None
    report: Callable[[str], None] = _say
    poll_s: float = 2.0
    path: Path = field(init=False)
    run: ProfileRun | None = field(init=False, default=None)
    calibration: Calibration | None = field(init=False, default=None)

    def __post_init__(self):
        self.path = cache_dir() / f"{key_name(self.engine.calibration_key())}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = None
        self._next_poll = 0.0
        self.announced = False  # the fallback line was printed: the switch gets its line too

    @classmethod
    def start(cls, engine, strategy: str, fallback: str, budget_s: float | None = None,
              report: Callable[[str], None] = _say) -> "FirstUse | None":
        """None when this pair's profile is here already (the engine then decodes with `strategy` at once)."""
        fu = cls(engine, strategy, fallback, resolve_budget(budget_s, engine.device), report)
        if fu._poll():
            fu.finish()
            return None
        who = "profiling it now" if fu.run is not None else "another process is profiling it"
        fu.report(f"calibration: no profile of this model pair here yet ({who}, budget "
                  f"{fu.budget_s or 0:.0f} s); decoding with fallback strategy '{fallback}' until it lands "
                  f"-> {fu.path}")
        fu.announced = True
        return fu

    def _poll(self) -> bool:
        """The file is here (loaded), or this process now holds the lock and profiles."""
        if self.path.is_file():
            self.calibration = load_calibration(self.path, self.engine.calibration_key())
            return True
        if self._lock is None:
            lock = open(self.path.with_suffix(".lock"), "w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                return False
            self._lock = lock
            if self.path.is_file():  # landed between the check and the lock
                return self._poll()
            self.run = ProfileRun.beside(self.engine, budget_s=self.budget_s, report=self.report)
        return False

    @property
    def ready(self) -> bool:
        return self.calibration is not None

    def advance(self, slice_s: float) -> bool:
        """Profile for about slice_s seconds, or look for another process's file; True when the calibration is
        ready. Touches only the profile's own engine: no lock on `engine` needed."""
        if self.ready:
            return True
        if self.run is not None:
            if self.run.advance(slice_s):
                self.calibration = self.run.calibration
                self.calibration.save(self.path)
                self._release()
        elif time.perf_counter() >= self._next_poll:
            self._next_poll = time.perf_counter() + self.poll_s
            self._poll()
        return self.ready

    def finish(self) -> None:
        """Switch the engine to its configured strategy (between its steps) and say how good the fit is."""
        e = self.engine
        e.calibration = self.calibration
        e.set_strategy(self.strategy)
        if self.run is not None:
            self.report(quality_line(self.calibration) + f"; switching from '{self.fallback}' to '{self.strategy}'")
        elif self.announced:
            self.report(f"calibration: loaded {self.path} (step-time model cross-validated error "
                        f"{100 * self.calibration.step_cv_error:.1f}%); switching from '{self.fallback}' to "
                        f"'{self.strategy}'")
        self.run = None

    def status(self) -> dict:
        state = "ready" if self.ready else "profiling" if self.run is not None else "waiting"
        return {"state": state, "progress": self.run.progress() if self.run is not None else "",
                "strategy": self.engine.strategy.name}

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing drops the flock
            self._lock = None

    def close(self) -> None:
        self._release()


class SpeculativeEngine(Engine):
    """The engine as users build it: `calibration='auto'` means this model pair's profile from the cache here, or
    one profiled now (`resolve_calibration`), resolved when the adaptive strategy first needs it."""

    def __init__(self, *args, calibration=None, **kwargs):
        if isinstance(calibration, str) and calibration == "auto":
            calibration = auto_calibration
        super().__init__(*args, calibration=calibration, **kwargs)


def auto_calibration(engine: Engine) -> Calibration:
    return resolve_calibration(engine, "auto")
