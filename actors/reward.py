"""Sequence scores: a weighted sum of a reward model's score and a reward function's score on the decoded text."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from configs.schema import TrainerConfig
from trainer.core.experience import sequence_scores
from trainer.core.reward_fn import FnScores, load_reward_fn, score_samples
from trainer.core.deepspeed_backend import load_scalar_head_model, resolve_dtype


@dataclass
class RewardScores:
    total: torch.Tensor  # [B] rm_weight * RM score + reward_fn_weight * function score: the training reward
    fn: FnScores | None  # the reward function's own scores and extra keys (score/* and eval/* metrics)


class RewardActor:
    def __init__(self, model_path: str | None, trainer: TrainerConfig, dtype: str | None = None,
                 batch_size: int = 16) -> None:
        torch.set_num_threads(trainer.threads_per_actor)
        self.device = torch.device("cuda" if trainer.gpus_per_actor > 0 else "cpu")
        self.rm_weight, self.fn_weight = trainer.rm_weight, trainer.reward_fn_weight
        self.batch_size = batch_size
        self.model = None
        if self.rm_weight != 0.0:
            if not model_path:
                raise ValueError(f"reward: rm_weight={self.rm_weight} but no reward model path is given")
            self.model = load_scalar_head_model(model_path, "reward", "reward", resolve_dtype(self.device, dtype))
            self.model.to(self.device).eval().requires_grad_(False)
        self.fn = load_reward_fn(trainer.reward_fn) if trainer.reward_fn else None
        if self.model is None and self.fn is None:
            raise ValueError("reward: rm_weight is 0 and there is no reward_fn, nothing would be scored")

    def ready(self) -> bool:
        return True

    @torch.no_grad()
    def score(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompts: list,
              responses: list[str]) -> RewardScores:
        """RM score at the last real token of each sequence, and the reward function on each (prompt, response)
        (prompts: trainer.data.Prompt, carrying data_source, ground truth and extra_info)."""
        batch = sequences.shape[0]
        if len(prompts) != batch or len(responses) != batch:
            raise ValueError(f"reward.score: {batch} sequences but {len(prompts)} prompts and "
                             f"{len(responses)} responses")
        total = torch.zeros(batch, dtype=torch.float32)
        if self.model is not None:
            sequences, attention_mask = sequences.to(self.device), attention_mask.to(self.device)
            rm = torch.cat([
                sequence_scores(self.model, sequences[i : i + self.batch_size], attention_mask[i : i + self.batch_size])
                for i in range(0, batch, self.batch_size)
            ]).float().cpu()
            total += self.rm_weight * rm
        fn = None
        if self.fn is not None:
            fn = score_samples(self.fn, prompts, responses)
            total += self.fn_weight * torch.tensor(fn.scores, dtype=torch.float32)
        return RewardScores(total, fn)
