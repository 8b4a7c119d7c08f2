"""Recovery from dead actors (DESIGN.md, Recovery): who died and why, the run's restart budget
(trainer.max_restarts) with one line per restart, and stateless roles that are made again in place with their
call retried. Roles with training state rewind instead: `trainer/loop/run.py:rewind`."""
from __future__ import annotations

import re

import ray

from trainer.loop.deadline import Stuck, wait


def ray_reason(error: BaseException) -> str:
    """Ray's reason for a death in a few words (its message runs to a dozen lines)."""
    text = str(getattr(error, "error_msg", None) or error)
    detail = re.search(r"Worker exit detail: (.*?)(?: There are some potential| Some common causes|$)", text, re.S)
    pid = re.search(r"\tpid: (\d+)", text)
    if detail:
        reason = " ".join(detail.group(1).split()).rstrip(".")
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("\t")]
        reason = (lines[-1] if lines else type(error).__name__).split(". ")[0].rstrip(".")
    return reason + (f", pid {pid.group(1)}" if pid else "")


def is_death(error: BaseException) -> bool:
    """An actor died or stopped answering (as opposed to an error raised by its code)."""
    return isinstance(error, (ray.exceptions.RayActorError, Stuck))


def probe(handles: dict, timeout_s: float = 30.0, grace_s: float = 2.0) -> dict[str, str]:
    """{name: Ray's reason} for the actors in `handles` ({name: handle}) that are dead. Once one is found the
    others get `grace_s` to answer (a live one may be busy, e.g. in a collective with the dead one); only when
    none is dead do those silent for `timeout_s` count as stuck."""
    import time

    refs = {handle.__ray_ready__.remote(): name for name, handle in handles.items()}
    pending, dead, end = list(refs), {}, time.monotonic() + timeout_s
    while pending and time.monotonic() < end:
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, end - time.monotonic()))
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as e:
                dead[refs[ref]] = ray_reason(e)
                end = min(end, time.monotonic() + grace_s)
    if not dead:
        dead = {refs[ref]: f"no answer in {timeout_s:.0f} s" for ref in pending}
    return dead


class RestartsExhausted(RuntimeError):
    """An actor died with no restart left: launch.py prints `line()` and exits with status 3."""

    def __init__(self, actor: str, reason: str, limit: int):
        super().__init__(f"{actor} died ({reason})")
        self.actor, self.reason, self.limit = actor, reason, limit


class Restarts:
    """The run's budget of restarts (trainer.max_restarts), one console line each."""

    def __init__(self, limit: int, log=print):
        self.limit, self.used, self.log = limit, 0, log
        self.redone = 0  # iterations done again after rewinds

    def take(self, actor: str, reason: str, then: str) -> None:
        """Spend one restart on `actor`'s death (`then`: what happens now), or raise RestartsExhausted."""
        if self.used >= self.limit:
            raise RestartsExhausted(actor, reason, self.limit)
        self.used += 1
        self.log(f"restart {self.used}/{self.limit}: {actor} died ({reason}); {then}", flush=True)


class Restartable:
    """A stateless role's actor (reference, reward): when it dies it is made again in place and the call that
    found it dead is sent again; `make()` builds a new one."""

    def __init__(self, role: str, make, restarts: Restarts | None = None, timeout_s: float | None = None):
        self.role, self.make, self.restarts, self.timeout_s = role, make, restarts, timeout_s
        self.handle = make()

    def call(self, method: str, *args) -> "Call":
        return Call(self, method, args)

    def restart(self, reason: str) -> None:
        if self.restarts is None:
            raise RestartsExhausted(self.role, reason, 0)
        self.restarts.take(self.role, reason, "made again in place, its call retried; no iterations to redo")
        ray.kill(self.handle)  # a stuck one; a dead one is gone already
        self.handle = self.make()
        wait(self.handle.ready.remote(), self.timeout_s, f"{self.role} start-up")

    def kill(self) -> None:
        ray.kill(self.handle)


class Call:
    """One call to a Restartable, in flight; `get` waits for it (with the deadline), retrying on a new actor."""

    def __init__(self, owner: Restartable, method: str, args: tuple):
        self.owner, self.method, self.args = owner, method, args
        self.ref = getattr(owner.handle, method).remote(*args)

    def get(self):
        while True:
            try:
                return wait(self.ref, self.owner.timeout_s, f"{self.owner.role}.{self.method}")
            except (ray.exceptions.RayActorError, Stuck) as e:
                self.owner.restart(ray_reason(e))
                self.ref = getattr(self.owner.handle, self.method).remote(*self.args)
