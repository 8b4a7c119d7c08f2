"""The sending side of weight sync, mixed into the policy trainer: rank 0 broadcasts HF-named tensors.

Every rank walks the parameters (under ZeRO-3 each gather is a collective of the trainer group); only
rank 0, the one that joined the weight group, sends.
"""
from __future__ import annotations

import ray

from migration.collective import CollectiveGroup, free_port


class WeightSender:
    """Needs `self.strategy` (DeepspeedStrategy) and `self.engine` (the DeepSpeed engine)."""

    _weight_group: CollectiveGroup | None = None

    def weight_group_address(self) -> tuple[str, int]:
        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> bool:
        self._weight_group = CollectiveGroup(host, port, rank, world_size, "weights", backend)
        return True

    def weight_specs(self) -> list[tuple[str, tuple, str]]:
        return [(name, tuple(t.shape), str(t.dtype).removeprefix("torch."))
                for name, t in self.strategy.full_state_dict(self.engine)]

    def broadcast_weights(self) -> int:
        count = 0
        for _, tensor in self.strategy.full_state_dict(self.engine):
            if self._weight_group is not None:
                self._weight_group.broadcast(tensor.detach().to(self._weight_group.device).contiguous(), src=0)
            count += 1
        return count
