"""Sequence scores: a weighted sum of a reward model's score and a rule reward on the decoded text."""

from __future__ import annotations

import torch

from trainer.experience import sequence_scores
from trainer.rewards import get_rule_reward
from trainer.strategy import load_scalar_head_model, resolve_dtype


class RewardActor:
    def __init__(self, model_path: str | None, rule_reward: str | None = None, rule_weight: float = 0.0,
                 rm_weight: float = 1.0, device: str = "cpu", threads: int = 1, dtype: str | None = None,
                 batch_size: int = 16) -> None:
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.rule_weight, self.rm_weight, self.batch_size = float(rule_weight), float(rm_weight), batch_size
        self.model = None
        if self.rm_weight != 0.0:
            if not model_path:
                raise ValueError(f"reward: rm_weight={rm_weight} but no reward model path is given")
            self.model = load_scalar_head_model(model_path, "reward", "reward", resolve_dtype(self.device, dtype))
            self.model.to(self.device).eval().requires_grad_(False)
        self.rule = None
        if self.rule_weight != 0.0:
            if not rule_reward:
                raise ValueError(f"reward: rule_weight={rule_weight} but no rule_reward is named")
            self.rule = get_rule_reward(rule_reward)
        if self.model is None and self.rule is None:
            raise ValueError("reward: both rm_weight and rule_weight are 0, nothing would be scored")

    def ready(self) -> bool:
        return True

    @torch.no_grad()
    def score(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompts_text: list[str],
              responses_text: list[str]) -> torch.Tensor:
        """[B] float: rm_weight * RM score at the last real token + rule_weight * rule(prompt, response)."""
        batch = sequences.shape[0]
        if len(prompts_text) != batch or len(responses_text) != batch:
            raise ValueError(f"reward.score: {batch} sequences but {len(prompts_text)} prompts and "
                             f"{len(responses_text)} responses")
        total = torch.zeros(batch, dtype=torch.float32)
        if self.model is not None:
            sequences, attention_mask = sequences.to(self.device), attention_mask.to(self.device)
            rm = torch.cat([
                sequence_scores(self.model, sequences[i : i + self.batch_size], attention_mask[i : i + self.batch_size])
                for i in range(0, batch, self.batch_size)
            ]).float().cpu()
            total += self.rm_weight * rm
        if self.rule is not None:
            rule = torch.tensor([float(self.rule(p, r)) for p, r in zip(prompts_text, responses_text)])
            total += self.rule_weight * rule
        return total
