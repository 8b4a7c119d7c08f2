"""The rollout fleet: N generation instances, one request split, one gather, nothing lost.

A request whose instance dies goes to a live one and restarts from its prompt; its per-request seed
makes the restarted sample the one the dead instance would have produced.
"""
from __future__ import annotations

import ray
from tqdm import tqdm

from actors.generation import GenerationInstanceActor
from configs.schema import GenerationConfig


class RolloutError(RuntimeError):
    pass


class RolloutFleet:
    def __init__(self, gen: GenerationConfig, actor_path: str, draft_path: str, dtype: str = "float32"):
        device = "cuda" if gen.gpus_per_instance > 0 else "cpu"
        cls = GenerationInstanceActor.options(num_cpus=gen.cpus_per_instance, num_gpus=gen.gpus_per_instance,
                                              max_concurrency=4)
        self.instances = [cls.remote(i, actor_path, draft_path, gen.strategy, gen.max_slots, gen.max_len,
                                     device, gen.threads_per_instance, dtype)
                          for i in range(gen.num_instances)]
        ray.get([inst.ping.remote() for inst in self.instances])  # surface model-loading errors now
        self.alive = list(range(len(self.instances)))
        self.backend = "nccl" if device == "cuda" else "gloo"
        self._weight_group_ready = False

    def run(self, requests: list, progress: bool = False) -> list:
        """Send each request to one instance (round-robin) and return every output exactly once."""
        by_id = {r.request_id: r for r in requests}
        if len(by_id) != len(requests):
            raise RolloutError("duplicate request ids in one rollout")
        pending = {i: [] for i in self.alive}
        for n, request in enumerate(requests):
            pending[self.alive[n % len(self.alive)]].append(request.request_id)
        ray.get([self.instances[i].submit.remote([by_id[r] for r in rids]) for i, rids in pending.items()])
        pending = {i: set(rids) for i, rids in pending.items()}
        outputs = {}
        with tqdm(total=len(requests), desc="rollout", unit="sample", leave=False, disable=not progress) as bar:
            while len(outputs) < len(requests):
                polls = {i: self.instances[i].collect.remote(0.2) for i in self.alive}
                for i, ref in polls.items():
                    try:
                        done = ray.get(ref)
                    except ray.exceptions.RayActorError:
                        self._reassign(i, pending, by_id)
                        continue
                    for out in done:
                        if out.request_id in outputs or out.request_id not in by_id:
                            raise RolloutError(f"instance {i} returned {out.request_id!r} twice or unasked")
                        outputs[out.request_id] = out
                        pending[i].discard(out.request_id)
                    bar.update(len(done))
        return [outputs[r.request_id] for r in requests]

    def _reassign(self, dead: int, pending: dict, by_id: dict) -> None:
        self.alive.remove(dead)
        self._weight_group_ready = False  # the old group counted the dead instance
        orphans = sorted(pending.pop(dead))
        if not self.alive:
            raise RolloutError(f"every generation instance died; {len(orphans)} samples could not finish")
        print(f"generation instance {dead} died; resubmitting its {len(orphans)} samples", flush=True)
        for n, rid in enumerate(orphans):
            target = self.alive[n % len(self.alive)]
            ray.get(self.instances[target].submit.remote([by_id[rid]]))
            pending[target].add(rid)

    def stats(self) -> list:
        return ray.get([self.instances[i].stats.remote() for i in self.alive])

    def sync_weights_from(self, policy) -> None:
        """Trainer rank 0 broadcasts every parameter once over the weight group to all live instances."""
        sender = policy.actors[0]
        if not self._weight_group_ready:
            host, port = ray.get(sender.weight_group_address.remote())
            world = 1 + len(self.alive)
            joins = [self.instances[i].join_weight_group.remote(host, port, rank, world, self.backend)
                     for rank, i in enumerate(self.alive, start=1)]
            ray.get([sender.join_weight_group.remote(host, port, 0, world, self.backend)] + joins)
            self._weight_group_ready = True
        specs = ray.get(policy.call_all("weight_specs"))[0]
        receives = [self.instances[i].receive_weights.remote(specs) for i in self.alive]
        ray.get(policy.call_all("broadcast_weights") + receives)
