"""Weight sync over one collective group: [policy rank 0, draft trainer (when the draft adapts online),
generation instances...]. A push is the actor's HF-named tensors broadcast from rank 0, then the draft's
from rank 1. A broadcast needs every member of the group, so each sender also takes part in the other's
broadcast and drops what it receives: one tensor of memory at a time and, with NCCL's pipelined ring, about
no time; the draft's weights go straight from the draft trainer's device to the instances.

Every policy rank walks the parameters (under ZeRO-3 each gather is a collective of the trainer group); only
rank 0, the one that joined the weight group, sends.
"""
from __future__ import annotations

from typing import Iterator

import ray
import torch

from migration.collective import CollectiveGroup, free_port

ACTOR_SRC, DRAFT_SRC = 0, 1  # group ranks of the two senders; instances follow them


def receive_broadcast(group: CollectiveGroup, specs: list[tuple[str, tuple, str]], src: int) -> dict[str, torch.Tensor]:
    """Every tensor named in specs (name, shape, dtype name), broadcast from group rank src, in order."""
    named = {}
    for name, shape, dtype in specs:
        tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=group.device)
        named[name] = group.broadcast(tensor, src=src)
    return named


class WeightSender:
    """Mixed into the actors that send weights; they define `sync_tensors()`: (HF name, tensor) pairs."""

    _weight_group: CollectiveGroup | None = None

    def sync_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def weight_group_address(self) -> tuple[str, int]:
        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str,
                          timeout_s: float = 300.0) -> bool:
        """timeout_s: the group's op timeout, so a peer that dies mid-broadcast fails the others in bounded time."""
        self._weight_group = CollectiveGroup(host, port, rank, world_size, "weights", backend, timeout_s)
        return True

    def weight_specs(self) -> list[tuple[str, tuple, str]]:
        return [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in self.sync_tensors()]

    def broadcast_weights(self) -> int:
        count = 0
        for _, tensor in self.sync_tensors():
            if self._weight_group is not None:
                group = self._weight_group
                group.broadcast(tensor.detach().to(group.device).contiguous(), src=group.rank)
            count += 1
        return count

    def drop_broadcast(self, specs: list[tuple[str, tuple, str]], src: int) -> int:
        """Take part in the other sender's broadcast (every member must) and drop the tensors."""
        count = 0
        for name, shape, dtype in specs:
            receive_broadcast(self._weight_group, [(name, shape, dtype)], src)
            count += 1
        return count
