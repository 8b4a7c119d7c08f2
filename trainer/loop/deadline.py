"""No wait without a deadline: every `ray.get` of the run goes through `wait`, so a stuck or silently dead actor
becomes an error that names the call, which recovery (trainer/loop/recovery.py) then handles."""
from __future__ import annotations

import ray


class Stuck(RuntimeError):
    """A call got no answer before its deadline."""


def wait(refs, timeout_s: float | None, what: str):
    """ray.get(refs) that gives up after timeout_s (None: no deadline, for callers outside a run)."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise Stuck(f"{what}: no answer in {timeout_s:.0f} s (trainer.call_timeout_s)") from None
