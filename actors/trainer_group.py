"""A data-parallel group of training ranks (policy or critic) as Ray actors, and the rank base they share.

`create_trainer_group` places W actors, gives them one rendezvous address, runs `init` on all at once and
returns a `TrainerGroup` whose `call_*` helpers return Ray object refs (the caller decides when to wait).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from trainer.core.experience import Experience
from trainer.core.deepspeed_backend import DeepSpeedBackend, resolve_dtype


def quiet_deepspeed() -> None:
    """DeepSpeed picks its accelerator on first use and says so (a warning on a CPU machine), which lands in the
    middle of an iteration's progress bars: pick it now, at the actor's start, without the line. DeepSpeed's own
    import already picks it, so without a GPU it is named (DS_ACCELERATOR=cpu) before that import."""
    import logging

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # picked by name: no auto-detect warning
    from deepspeed.utils import logger

    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from deepspeed.accelerator import get_accelerator

        get_accelerator()
    finally:
        logger.setLevel(level)


# ------------------------------------------------------------------------------------------ rank base
class TrainerRank:
    """One rank of a DeepSpeed-trained role: distributed set-up, engine, update counter, checkpoints."""

    role = "trainer"

    def __init__(
        self,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        model_path: str,
        train_cfg: dict,
        device: str | None = None,
        threads: int | None = None,
    ) -> None:
        self.rank, self.world_size = rank, world_size
        self.master_addr, self.master_port = master_addr, master_port
        self.model_path, self.cfg = model_path, dict(train_cfg)
        self.device = torch.device(device or self.cfg.get("device", "cpu"))
        torch.set_num_threads(int(threads or self.cfg.get("threads", 1)))
        quiet_deepspeed()
        if "lr" not in self.cfg:
            raise ValueError(f"{self.role} train_cfg has no 'lr'")
        self.seed = int(self.cfg.get("seed", 0))
        self.micro_batch_size = int(self.cfg.get("micro_batch_size", 4))
        self.grad_accum = int(self.cfg.get("grad_accum", 1))
        self.ppo_epochs = int(self.cfg.get("ppo_epochs", 1))
        self.dtype = resolve_dtype(self.device, self.cfg.get("dtype"))
        self.backend = DeepSpeedBackend(str(self.device), seed=self.seed)
        self.engine = None
        self.updates_done = 0  # resumes with the checkpoint; seeds minibatch shuffling when no iteration is given

    # -- set-up
    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def init(self) -> bool:
        """Load the model (fails fast on a bad path), join the group, build the DeepSpeed engine."""
        model = self.build_model()
        self.backend.setup_distributed(self.rank, self.world_size, self.master_addr, self.master_port)
        self.engine = self.backend.prepare(
            model,
            lr=float(self.cfg["lr"]),
            weight_decay=float(self.cfg.get("weight_decay", 0.0)),
            zero_stage=int(self.cfg.get("zero_stage", 2)),
            micro_batch_size=self.micro_batch_size,
            grad_accum=self.grad_accum,
            max_norm=float(self.cfg.get("max_norm", 1.0)),
            bf16=self.dtype == torch.bfloat16,
            fp16=self.dtype == torch.float16,
        )
        return True

    def ready(self) -> bool:
        return self.engine is not None

    # -- shared pieces of update
    def _check_batches(self, experience: Experience, *needed: str) -> int:
        """Number of micro batches per epoch; every rank runs the same count, whole accumulation windows."""
        for name in needed:
            if getattr(experience, name) is None:
                raise ValueError(f"{self.role}.update: experience.{name} is None (compute it before the update)")
        n_micro = -(-experience.batch_size // self.micro_batch_size)
        if n_micro % self.grad_accum != 0:
            raise ValueError(
                f"{self.role}.update: shard of {experience.batch_size} rows gives {n_micro} micro batches of "
                f"{self.micro_batch_size}, not a multiple of grad_accum={self.grad_accum}"
            )
        return n_micro

    def _shuffle_seed(self, iteration: int | None, epoch: int) -> int:
        step = self.updates_done if iteration is None else int(iteration)
        return (self.seed * 1_000_003 + step * 1_009 + epoch) % (2**63)

    def _finish_update(self, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        self.updates_done += 1
        local = {k: sums[k] / max(counts[k], 1) for k in sums}
        return self.backend.all_reduce_mean(local)

    def _forward_batched(self, fn, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int):
        """fn(seqs, mask) -> [b, R] (or a tuple of [b, R, ...]) over micro batches; [B, R] on CPU, floats as
        float32 (B may be 0 on an uneven split).

        Under ZeRO-3 every forward is a collective, so every rank runs the same number (padding with a dummy row).
        """
        batch = sequences.shape[0]
        order = attention_mask.sum(1).argsort()  # similar lengths share a chunk: less padding to compute
        sequences, attention_mask = sequences[order].to(self.device), attention_mask[order].to(self.device)
        chunks = [slice(i, i + self.micro_batch_size) for i in range(0, batch, self.micro_batch_size)]
        if self.backend.zero_stage == 3 and self.world_size > 1:
            import torch.distributed as dist

            n = torch.tensor([len(chunks)], dtype=torch.long, device=self.backend.comm_device())
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            chunks += [None] * (int(n.item()) - len(chunks))
        dummy = torch.zeros(1, sequences.shape[1], dtype=torch.long, device=self.device)
        out = [fn(sequences[c], attention_mask[c]) if c is not None else fn(dummy, torch.ones_like(dummy))
               for c in chunks]
        if not out:  # an empty shard: one dummy row gives the outputs' shapes, then none of it is kept
            out = [fn(dummy, torch.ones_like(dummy))]
        unsort = order.argsort()

        def gather(parts):
            t = torch.cat(parts)[:batch].cpu()
            return (t.float() if t.is_floating_point() else t)[unsort]

        return tuple(map(gather, zip(*out))) if isinstance(out[0], tuple) else gather(out)

    # -- checkpoints
    def save_checkpoint(self, ckpt_dir: str) -> bool:
        """DeepSpeed checkpoint (weights, optimizer, counters); every rank must call."""
        self.backend.save(self.engine, ckpt_dir, client_state={"updates_done": self.updates_done})
        return True

    def load_checkpoint(self, ckpt_dir: str) -> bool:
        client_state = self.backend.load(self.engine, ckpt_dir)
        self.updates_done = int(client_state.get("updates_done", 0))
        return True

    def save_hf(self, out_dir: str) -> bool:
        """HF save_pretrained dir of the model (rank 0 writes; all ranks must call under ZeRO-3)."""
        tokenizer_path = self.cfg.get("tokenizer_path")
        if tokenizer_path is None and (Path(self.model_path) / "tokenizer_config.json").is_file():
            tokenizer_path = self.model_path  # the tiny world keeps its tokenizer next to the actor
        self.backend.save_hf(self.engine, tokenizer_path, out_dir)
        return True

    def get_state_dict(self, all_ranks: bool = False) -> dict[str, torch.Tensor] | None:
        """HF-named full state dict on CPU, on rank 0 (or every rank); all ranks must call under ZeRO-3."""
        state = {name: t.detach().to("cpu", copy=True) for name, t in self.backend.full_state_dict(self.engine)}
        return state if (self.rank == 0 or all_ranks) else None


# ------------------------------------------------------------------------------------------- the group
@dataclass
class TrainerGroup:
    """W Ray actors of one role; the `call_*` helpers return one object ref per rank, in rank order."""

    actors: list
    placement_group: Any = None
    master_addr: str = ""
    master_port: int = 0
    world_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.world_size = len(self.actors)

    def call_all(self, method: str, *args, **kwargs) -> list:
        """The same arguments to every rank."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call_sharded(self, method: str, experience: Experience, *args, **kwargs) -> list:
        """Rank i gets experience.split(W)[i] (equal contiguous shards) plus the same extra arguments."""
        shards = experience.split(self.world_size)
        return [getattr(a, method).remote(s, *args, **kwargs) for a, s in zip(self.actors, shards)]

    def call_split(self, method: str, *args, **kwargs) -> list:
        """Tensor arguments split contiguously along dim 0 across ranks; others passed whole.

        Concatenate the results (torch.cat(ray.get(refs))) to get the batch back in order.
        """
        batch = next(a.shape[0] for a in args if isinstance(a, torch.Tensor))
        bounds = [batch * i // self.world_size for i in range(self.world_size + 1)]
        refs = []
        for i, actor in enumerate(self.actors):
            part = slice(bounds[i], bounds[i + 1])
            rank_args = [a[part] if isinstance(a, torch.Tensor) else a for a in args]
            refs.append(getattr(actor, method).remote(*rank_args, **kwargs))
        return refs

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)


def get_fail_fast(refs: list) -> list:
    """ray.get that raises the first error as soon as it happens (the other ranks may be stuck waiting for it)."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return ray.get(refs)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@ray.remote(num_cpus=0)
def _rendezvous_address() -> tuple[str, int]:
    """Run inside rank 0's bundle: the address the group's process group meets at."""
    host = ray.util.get_node_ip_address()
    return host, _free_port(host)


def create_trainer_group(
    actor_cls,
    world_size: int,
    resources: dict | tuple,
    *args,
    pg_strategy: str = "PACK",
    **kwargs,
) -> TrainerGroup:
    """W ranks of actor_cls(rank, W, addr, port, *args, **kwargs), each `init`-ed; fails with the first error.

    resources: per rank, {"num_cpus": c, "num_gpus": g} or (c, g). With GPUs the ranks go in a placement
    group (PACK by default; STRICT_PACK keeps one node) and rank 0's node hosts the rendezvous.
    """
    if isinstance(resources, dict):
        num_cpus, num_gpus = float(resources.get("num_cpus", 1)), float(resources.get("num_gpus", 0))
    else:
        num_cpus, num_gpus = (float(r) for r in resources)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    remote_cls = actor_cls if hasattr(actor_cls, "remote") else ray.remote(actor_cls)
    pg = None
    if num_gpus > 0:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundles = [{"CPU": num_cpus, "GPU": num_gpus} for _ in range(world_size)]
        pg = placement_group(bundles, strategy=pg_strategy)
        ray.get(pg.ready())
        at = lambda i: PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)  # noqa: E731
        addr, port = ray.get(_rendezvous_address.options(scheduling_strategy=at(0)).remote())
        options = [dict(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=at(i)) for i in range(world_size)]
    else:
        addr = ray.util.get_node_ip_address()
        port = _free_port(addr)
        options = [dict(num_cpus=num_cpus) for _ in range(world_size)]
    actors = [
        remote_cls.options(**options[i]).remote(i, world_size, addr, port, *args, **kwargs) for i in range(world_size)
    ]
    group = TrainerGroup(actors, pg, addr, port)
    try:
        get_fail_fast(group.call_all("init"))
    except Exception:
        group.shutdown()
        raise
    return group
