"""Fault injection for the recovery tests and bench.recovery: SIGKILL an actor's worker process at a chosen phase
of a chosen iteration, from the driver's process, as the OOM killer or a lost node would.

Each fault hooks the driver-side call that starts the phase and kills the process once that call is in flight
(the task submitted, so it dies with the call unanswered). Every kill happens once: the iterations a rewind
redoes run undisturbed. The hooks wrap methods of the driver-side classes and `restore()` puts them back.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

import ray

# (role, phase) pairs this module can inject
PAIRS = [("policy", "update"), ("policy", "weight push"), ("reference", "experience"), ("reward", "experience"),
         ("draft trainer", "update"), ("generation instance", "rollout"), ("generation instance", "evaluation"),
         ("critic", "update"), ("load balancer", "moving samples")]


@dataclass
class Fault:
    role: str  # one of PAIRS' roles
    phase: str
    iteration: int
    killed_at: float | None = None  # time.time() of the kill
    pid: int | None = None


def pid_of(handle) -> int:
    """The worker process of an actor (asked while it is idle: a busy actor answers after its call)."""
    return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=60)


@dataclass
class Injector:
    faults: list[Fault]
    iteration: int | None = None  # the driver's, as its phases start
    phase: str | None = None
    logged: list[tuple[float, int]] = field(default_factory=list)  # (time, step) of each tracked iteration
    restarts: list[float] = field(default_factory=list)  # time.time() of each restart line
    _restore: list = field(default_factory=list)

    def due(self, role: str, phase: str) -> Fault | None:
        for f in self.faults:
            if f.killed_at is None and (f.role, f.phase, f.iteration) == (role, phase, self.iteration):
                return f
        return None

    def kill(self, fault: Fault, pid: int) -> None:
        fault.pid, fault.killed_at = pid, time.time()
        os.kill(pid, signal.SIGKILL)

    def patch(self, cls, name: str, make) -> None:
        original = getattr(cls, name)
        setattr(cls, name, make(original))
        self._restore.append((cls, name, original))

    def restore(self) -> None:
        for cls, name, original in reversed(self._restore):
            setattr(cls, name, original)
        self._restore.clear()


def install(faults: list[Fault]) -> Injector:
    """Hook the driver, the trainer groups, stateless calls, the fleet and tracking; returns the injector."""
    from actors.trainer_group import TrainerGroup
    from trainer.loop import rollout
    from trainer.loop.driver import Driver
    from trainer.loop.recovery import Restartable, Restarts
    from trainer.loop.rollout import RolloutFleet
    from trainer.loop.tracking import Tracking

    inj = Injector(faults)

    def phase(name):
        def make(original):
            def wrapped(self, *args, **kwargs):
                if name != "evaluation":
                    inj.iteration = args[-1] if name in ("generate", "update") else inj.iteration
                inj.phase = name
                if name == "update":
                    inj.driver = self
                    draft = inj.due("draft trainer", "update") if self.draft is not None else None
                    if draft is not None:  # killed right after its training call is sent: it dies training
                        handle, pid = self.draft, pid_of(self.draft)
                        self.draft = _KillAfterTrain(handle, lambda: inj.kill(draft, pid))
                        try:
                            return original(self, *args, **kwargs)
                        finally:
                            self.draft = handle
                return original(self, *args, **kwargs)
            return wrapped
        return make

    inj.patch(Driver, "generate", phase("generate"))
    inj.patch(Driver, "make_experience", phase("experience"))
    inj.patch(Driver, "update", phase("update"))
    inj.patch(Driver, "evaluate", phase("evaluation"))

    def sync(original):
        def wrapped(self, *args, **kwargs):
            inj.phase = "weight push" if inj.phase == "update" else "start-up"  # not the push after a rewind
            return original(self, *args, **kwargs)
        return wrapped

    inj.patch(Driver, "sync_weights", sync)

    def fit(original):
        def wrapped(self, start_iteration=0):
            inj.iteration = start_iteration  # evaluation comes before the iteration's rollout
            return original(self, start_iteration)
        return wrapped

    inj.patch(Driver, "fit", fit)

    def group_call(kind):
        def make(original):
            def wrapped(self, method, *args, **kwargs):
                role = _role_of_group(self)
                fault = None
                if method == "update":
                    fault = inj.due(role, "update")
                elif method == "broadcast_weights" and role == "policy" and inj.phase == "weight push":
                    fault = inj.due("policy", "weight push")
                pid = pid_of(self.actors[0]) if fault else None
                refs = original(self, method, *args, **kwargs)
                if fault:
                    inj.kill(fault, pid)
                return refs
            return wrapped
        return make

    inj.patch(TrainerGroup, "call_sharded", group_call("sharded"))
    inj.patch(TrainerGroup, "call_all", group_call("all"))

    def restartable_call(original):
        def wrapped(self, method, *args):
            role = {"reference": "reference", "reward actor": "reward"}[self.role]
            fault = inj.due(role, "experience") if inj.phase == "experience" else None
            pid = pid_of(self.handle) if fault else None
            call = original(self, method, *args)
            if fault:
                inj.kill(fault, pid)
            return call
        return wrapped

    inj.patch(Restartable, "call", restartable_call)

    def fleet_run(original):
        def wrapped(self, requests, *args, **kwargs):
            phase_name = "evaluation" if inj.phase == "evaluation" else "rollout"
            fault = inj.due("generation instance", phase_name)
            done = threading.Event()
            if fault:  # killed right after its share is submitted: it dies holding its samples, decoding
                victim = self.alive[-1]
                handle, pid = self.instances[victim], pid_of(self.instances[victim])
                fleet = self

                class Submit:
                    @staticmethod
                    def remote(*a, **k):
                        ref = handle.submit.remote(*a, **k)
                        ray.get(ref, timeout=60)  # queued there (the fleet's wait on it succeeds)
                        inj.kill(fault, pid)
                        fleet.instances[victim] = handle  # the fleet's own handle again from here on
                        return ref

                self.instances[victim] = _With(handle, submit=Submit)
            balancer = inj.due("load balancer", "moving samples") if phase_name == "rollout" else None
            split = rollout.assign
            if balancer is not None and self.balancer_cfg.enabled and len(self.alive) > 1:
                # this rollout's requests all go to the last instance: the balancer moves running samples
                # from it at once, while they have most of their tokens to come (the tokens stay the same:
                # each request has its own seed)
                rollout.assign = lambda n, workers, *_: [[] for _ in range(workers - 1)] + [list(range(n))]
                self._ready_balancer()
                held, bpid = self.balancer, pid_of(self.balancer)
                ray.get(held.hold_at.remote("verdict"))  # an order stops with both sides waiting

                def watch_balancer():
                    while not done.is_set():
                        if ray.get(held.held.remote()):
                            inj.kill(balancer, bpid)
                            return
                        time.sleep(0.01)

                threading.Thread(target=watch_balancer, daemon=True).start()
            try:
                return original(self, requests, *args, **kwargs)
            finally:
                done.set()
                rollout.assign = split
                if fault is not None and isinstance(self.instances[victim], _With):  # never submitted to
                    self.instances[victim] = handle
                if balancer is not None and balancer.killed_at is None and self.balancer is not None:
                    ray.get(self.balancer.hold_at.remote(None))
        return wrapped

    inj.patch(RolloutFleet, "run", fleet_run)

    def log(original):
        def wrapped(self, metrics, step):
            inj.logged.append((time.time(), step))
            return original(self, metrics, step)
        return wrapped

    inj.patch(Tracking, "log", log)

    def take(original):
        def wrapped(self, *args, **kwargs):
            inj.restarts.append(time.time())
            return original(self, *args, **kwargs)
        return wrapped

    inj.patch(Restarts, "take", take)
    return inj


class _With:
    """An actor handle with some methods replaced."""

    def __init__(self, handle, **methods):
        self._handle, self._methods = handle, methods

    def __getattr__(self, name):
        return self._methods.get(name) or getattr(self._handle, name)


class _KillAfterTrain:
    """A draft trainer's handle whose `train.remote` calls `after()` once the call is sent."""

    def __init__(self, handle, after):
        self._handle, self._after = handle, after

    def __getattr__(self, name):
        method = getattr(self._handle, name)
        if name != "train":
            return method
        outer = self

        class Train:
            @staticmethod
            def remote(*args, **kwargs):
                ref = method.remote(*args, **kwargs)
                outer._after()
                return ref
        return Train


def _role_of_group(group) -> str:
    """policy or critic, by the class of the group's actors."""
    name = group.actors[0]._ray_actor_creation_function_descriptor.class_name
    return "critic" if name == "Critic" else "policy"


def recovery_seconds(inj: Injector) -> list[dict]:
    """Per kill: seconds from the death to the next iteration logged after it (the run going on)."""
    rows = []
    for f in inj.faults:
        if f.killed_at is None:
            rows.append({"role": f.role, "phase": f.phase, "iteration": f.iteration, "killed": False})
            continue
        after = [t for t, _ in inj.logged if t > f.killed_at]
        restarted = [t for t in inj.restarts if t >= f.killed_at]
        rows.append({"role": f.role, "phase": f.phase, "iteration": f.iteration, "killed": True, "pid": f.pid,
                     "to_restart_line_s": round(restarted[0] - f.killed_at, 2) if restarted else None,
                     "to_next_iteration_s": round(after[0] - f.killed_at, 2) if after else None})
    return rows
