"""One data-parallel rank of the value model: per-token values and the clipped value-loss update."""

from __future__ import annotations

from collections import defaultdict

import torch

from actors.trainer_group import TrainerRank
from trainer.core import algorithms as algo
from trainer.core.experience import Experience, sequence_values
from trainer.core.deepspeed_backend import load_scalar_head_model


class Critic(TrainerRank):
    """train_cfg keys: lr, weight_decay, zero_stage, micro_batch_size, grad_accum, ppo_epochs, value_clip,
    max_norm, seed, dtype. init_from: "reward" (a 1-label sequence classifier) or "actor" (causal LM + new head)."""

    role = "critic"

    def __init__(self, rank, world_size, master_addr, master_port, model_path, train_cfg, init_from: str = "reward",
                 device: str | None = None, threads: int | None = None) -> None:
        super().__init__(rank, world_size, master_addr, master_port, model_path, train_cfg, device, threads)
        self.init_from = init_from

    def build_model(self) -> torch.nn.Module:
        torch.manual_seed(self.seed)  # the fresh value head (init_from="actor") is the same on every rank
        return load_scalar_head_model(self.model_path, "critic", self.init_from)

    @torch.no_grad()
    def values(self, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int) -> torch.Tensor:
        """Values [B, R] of the states that predict each response token."""
        self.engine.eval()
        return self._forward_batched(
            lambda s, a: sequence_values(self.engine, s, a, num_actions),
            sequences, attention_mask, num_actions,
        )

    def update(self, experience: Experience, iteration: int | None = None) -> dict[str, float]:
        """ppo_epochs passes of the clipped value loss (clip around experience.values) over this rank's shard."""
        value_clip = self.cfg.get("value_clip", 0.2)
        value_clip = None if value_clip is None or value_clip <= 0 else float(value_clip)
        self._check_batches(experience, "values", "returns")
        experience = experience.to(self.device)
        self.engine.train()

        sums, counts = defaultdict(float), defaultdict(int)
        for epoch in range(self.ppo_epochs):
            for mb in experience.minibatches(self.micro_batch_size, self._shuffle_seed(iteration, epoch),
                                             group_by_length=True):
                values = sequence_values(self.engine, mb.sequences, mb.attention_mask, mb.num_actions)
                loss = algo.value_loss(values, mb.values, mb.returns, mb.action_mask, value_clip)
                self.backend.backward(loss, self.engine)
                grad_norm = self.backend.step(self.engine)
                sums["value_loss"] += loss.item()
                sums["values_mean"] += algo.masked_mean(values.detach(), mb.action_mask).item()
                counts["value_loss"] += 1
                counts["values_mean"] += 1
                if grad_norm is not None:
                    sums["grad_norm"] += grad_norm
                    counts["grad_norm"] += 1
        return self._finish_update(sums, counts)
