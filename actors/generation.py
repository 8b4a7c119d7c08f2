"""GenerationInstance: a Ray actor that owns one speculative engine and steps it in the background."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import ray
import torch

from drafting import GenRequest, SpeculativeEngine
from migration.collective import CollectiveGroup


@dataclass
class InstanceStats:
    index: int
    live: int  # samples decoding now
    queued: int  # admitted, waiting for a slot
    finished_waiting: int  # done, not yet collected
    tokens_per_s: float
    mean_accepted: float
    steps: int


class GenerationInstance:
    """Thin actor: requests in, finished rollouts out; all decoding logic lives in `drafting/`."""

    def __init__(self, index: int, actor_path: str, draft_path: str, strategy: str, max_slots: int,
                 max_len: int, device: str = "cpu", threads: int = 1, dtype: str = "float32"):
        torch.set_num_threads(threads)
        self.index = index
        self.device = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
        self.engine = SpeculativeEngine(actor_path, draft_path, strategy=strategy, max_slots=max_slots,
                                        max_len=max_len, device=self.device, dtype=getattr(torch, dtype))
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._finished = []
        self._error: BaseException | None = None
        self._weight_group: CollectiveGroup | None = None
        self._loop = threading.Thread(target=self._step_loop, daemon=True, name=f"gen-{index}")
        self._loop.start()

    def _step_loop(self) -> None:
        while True:
            self._work.wait()
            try:
                with self._lock:
                    done = self.engine.step()
                    self._finished.extend(done)
                    stats = self.engine.stats()
                    if stats.live == 0 and stats.queued == 0:
                        self._work.clear()
            except BaseException as e:  # noqa: BLE001 - surfaced to the driver on its next call
                self._error = e
                self._work.clear()
                return

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"generation instance {self.index} step loop failed") from self._error

    def submit(self, requests: list[GenRequest]) -> int:
        """Queue requests atomically (one batch per call keeps the schedule reproducible)."""
        self._check()
        with self._lock:
            for request in requests:
                self.engine.add(request)
        self._work.set()
        return len(requests)

    def collect(self, wait_s: float = 0.0) -> list:
        """Finished rollouts since the last call; waits up to wait_s for the first one."""
        deadline = time.monotonic() + wait_s
        while True:
            self._check()
            with self._lock:
                if self._finished or time.monotonic() >= deadline:
                    out, self._finished = self._finished, []
                    return out
            time.sleep(0.005)

    def stats(self) -> InstanceStats:
        self._check()
        with self._lock:
            s = self.engine.stats()
            return InstanceStats(self.index, s.live, s.queued, len(self._finished), s.tokens_per_s,
                                 s.mean_accepted, s.steps)

    # --- weight sync: trainer rank 0 broadcasts, every instance receives -------------------------
    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> bool:
        self._weight_group = CollectiveGroup(host, port, rank, world_size, "weights", backend)
        return True

    def receive_weights(self, specs: list[tuple[str, tuple, str]]) -> int:
        """Receive every parameter named in specs from rank 0, then load them into the engine."""
        named = {}
        for name, shape, dtype in specs:
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self._weight_group.device)
            named[name] = self._weight_group.broadcast(tensor, src=0)
        with self._lock:  # only between iterations: no sample is live
            self.engine.load_target_weights(named)
        return len(named)

    def ping(self) -> int:
        return self.index


GenerationInstanceActor = ray.remote(GenerationInstance)
