"""One data-parallel rank of the policy: old log-probs, the PPO/GRPO update, checkpoints, weights to sync."""

from __future__ import annotations

from collections import defaultdict

import torch

from actors.trainer_group import TrainerRank
from actors.weight_sync import WeightSender
from trainer.core import algorithms as algo
from trainer.core.experience import Experience, sequence_logprobs, sequence_logprobs_features, sequence_logprobs_topk
from trainer.core.deepspeed_backend import load_causal_lm


class PolicyTrainer(WeightSender, TrainerRank):
    """train_cfg keys: lr, weight_decay, zero_stage, micro_batch_size, grad_accum, ppo_epochs, clip_eps,
    max_norm, temperature, kl_coef, kl_estimator, use_kl_loss, entropy_coef, seed, dtype, tokenizer_path."""

    role = "policy"

    def build_model(self) -> torch.nn.Module:
        model = load_causal_lm(self.model_path, "policy")  # fp32 master copy; DeepSpeed casts for bf16
        model.config.use_cache = False
        return model

    def sync_tensors(self):
        return self.backend.full_state_dict(self.engine)

    @torch.no_grad()
    def compute_logprobs(self, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int) -> torch.Tensor:
        """Log-probs [B, R] of the response tokens under the current policy (the rollout's temperature)."""
        self.engine.eval()
        temperature = float(self.cfg.get("temperature", 1.0))
        return self._forward_batched(
            lambda s, a: sequence_logprobs(self.engine, s, a, num_actions, temperature),
            sequences, attention_mask, num_actions,
        )

    @torch.no_grad()
    def compute_logprobs_topk(self, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int,
                              k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """compute_logprobs plus the draft trainer's teacher from the same logits: top-k log-probs and ids
        [B, R, k] per response position (a top-k of logits the pass computes anyway)."""
        self.engine.eval()
        temperature = float(self.cfg.get("temperature", 1.0))
        return self._forward_batched(
            lambda s, a: sequence_logprobs_topk(self.engine, s, a, num_actions, temperature, k),
            sequences, attention_mask, num_actions,
        )

    @torch.no_grad()
    def compute_logprobs_features(self, sequences: torch.Tensor, attention_mask: torch.Tensor,
                                  num_actions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """compute_logprobs plus a draft head's data from the same forward: the features [B, T, H] (the final
        norm's output, what the engine keeps for a head) at every position."""
        self.engine.eval()
        temperature = float(self.cfg.get("temperature", 1.0))
        return self._forward_batched(
            lambda s, a: sequence_logprobs_features(self.engine, s, a, num_actions, temperature),
            sequences, attention_mask, num_actions,
        )

    def update(self, experience: Experience, iteration: int | None = None) -> dict[str, float]:
        """ppo_epochs passes over this rank's shard in micro batches; metrics averaged over batches and ranks."""
        cfg = self.cfg
        clip_eps = float(cfg.get("clip_eps", 0.2))
        temperature = float(cfg.get("temperature", 1.0))
        entropy_coef = float(cfg.get("entropy_coef", 0.0))
        use_kl_loss = bool(cfg.get("use_kl_loss", False))
        kl_coef, kl_estimator = float(cfg.get("kl_coef", 0.0)), cfg.get("kl_estimator", "k3")
        needed = ("old_logprobs", "advantages") + (("ref_logprobs",) if use_kl_loss else ())
        self._check_batches(experience, *needed)
        experience = experience.to(self.device)
        self.engine.train()

        sums, counts = defaultdict(float), defaultdict(int)
        for epoch in range(self.ppo_epochs):
            for mb in experience.minibatches(self.micro_batch_size, self._shuffle_seed(iteration, epoch),
                                             group_by_length=True):
                logp, entropy = sequence_logprobs(
                    self.engine, mb.sequences, mb.attention_mask, mb.num_actions, temperature, return_entropy=True
                )  # [b, R] each
                loss, clip_frac, approx_kl = algo.policy_loss(
                    logp, mb.old_logprobs, mb.advantages, mb.action_mask, clip_eps
                )
                mean_entropy = algo.masked_mean(entropy, mb.action_mask)
                total = loss
                if entropy_coef:
                    total = total - entropy_coef * mean_entropy
                if use_kl_loss:
                    kl = algo.kl_loss(logp, mb.ref_logprobs, mb.action_mask, kl_estimator)
                    total = total + kl_coef * kl
                    sums["kl_loss"] += kl.item()
                    counts["kl_loss"] += 1
                self.backend.backward(total, self.engine)
                grad_norm = self.backend.step(self.engine)
                for key, value in (("policy_loss", loss), ("clip_frac", clip_frac), ("approx_kl", approx_kl),
                                   ("entropy", mean_entropy)):
                    sums[key] += value.item()
                    counts[key] += 1
                if grad_norm is not None:
                    sums["grad_norm"] += grad_norm
                    counts["grad_norm"] += 1
        return self._finish_update(sums, counts)

    def named_parameters_for_sync(self) -> list[tuple[str, tuple, str]] | None:
        """Rank 0: (HF name, shape, dtype name) of every parameter, in broadcast order."""
        if self.rank != 0:
            return None
        module = self.engine.module
        return [
            (name, tuple(getattr(p, "ds_shape", p.shape)), str(p.dtype).removeprefix("torch."))
            for name, p in module.named_parameters()
        ]
