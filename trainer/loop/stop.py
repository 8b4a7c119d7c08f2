"""A clean stop: SIGINT or SIGTERM ends a run with one line saying what was interrupted and where to resume from,
not a stack dump.

The handler raises `Interrupted` in the main thread (a KeyboardInterrupt, so no `except Exception` in the loop
swallows it, and Ray's `ray.get`, which checks signals itself, turns it into its own KeyboardInterrupt: hence the
handler also keeps it in `received`); `finally` blocks then shut the actors down, and launch.py prints the line
of `last()` and exits 128 + signal. What was running is read off the interrupted Python stack (the driver's loop
variable and phase method), so the driver needs no bookkeeping for it.
"""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# the Driver's and the run's functions, as the line names them
PHASES = {"generate": "generate", "make_experience": "make_experience", "update": "update",
          "sync_weights": "weight sync", "evaluate": "evaluation", "save": "checkpoint"}
STAGES = {"preflight": "the preflight", "init_ray": "Ray start-up", "build_actors": "actor start-up",
          "train": "start-up"}


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; `where` says what it interrupted."""

    def __init__(self, signum: int, where: str):
        super().__init__(where)
        self.signum, self.where = signum, where

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    def line(self, last_checkpoint) -> str:
        saved = f"last checkpoint {last_checkpoint}" if last_checkpoint else "no checkpoint yet"
        return f"interrupted during {self.where}; {saved}"


received: Interrupted | None = None  # the stop signal this process got, whatever exception Ray made of it


def install() -> dict:
    """Route SIGINT and SIGTERM to `Interrupted` (again after ray.init, which sets its own SIGTERM handler).
    Returns the handlers it replaced, for `restore`."""
    return {sig: signal.signal(sig, _interrupt) for sig in SIGNALS}


def last() -> Interrupted:
    """The stop signal received (a KeyboardInterrupt before `install`: SIGINT at start-up)."""
    return received or Interrupted(signal.SIGINT, "start-up")


def restore(handlers: dict) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _interrupt(signum, frame) -> None:
    global received
    for sig in SIGNALS:  # a second signal must not cut the shutdown short
        signal.signal(sig, signal.SIG_IGN)
    received = Interrupted(signum, describe(frame))
    raise received


def describe(frame) -> str:
    """"iteration 3 (generate)", "the preflight", ...: from the innermost frame outwards, the first driver phase
    and the loop's iteration, or the start-up stage."""
    phase = None
    while frame is not None:
        name = frame.f_code.co_name
        if name == "fit" and "iteration" in frame.f_locals:
            return f"iteration {frame.f_locals['iteration']}" + (f" ({phase})" if phase else "")
        if name == "fit":  # before the loop's first step
            return "start-up"
        if phase is None and name in PHASES:
            phase = PHASES[name]
        if name in STAGES:
            return STAGES[name] if phase is None else f"{STAGES[name]} ({phase})"
        frame = frame.f_back
    return "start-up"
