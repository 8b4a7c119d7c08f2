"""The frozen reference policy: log-probs of response tokens for the KL term."""

from __future__ import annotations

import torch

from trainer.core.experience import sequence_logprobs
from trainer.core.deepspeed_backend import load_causal_lm, resolve_dtype


class ReferenceActor:
    def __init__(self, model_path: str, device: str = "cpu", threads: int = 1, dtype: str | None = None,
                 batch_size: int = 16) -> None:
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = load_causal_lm(model_path, "reference", resolve_dtype(self.device, dtype)).to(self.device)
        self.model.eval().requires_grad_(False)

    def ready(self) -> bool:
        return True

    @torch.no_grad()
    def logprobs(self, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int,
                 temperature: float = 1.0) -> torch.Tensor:
        """Log-probs [B, R] of the response tokens under the reference model at the rollout temperature."""
        order = attention_mask.sum(1).argsort()  # similar lengths share a chunk: less padding to compute
        sequences, attention_mask = sequences[order].to(self.device), attention_mask[order].to(self.device)
        out = [
            sequence_logprobs(self.model, sequences[i : i + self.batch_size],
                              attention_mask[i : i + self.batch_size], num_actions, temperature)
            for i in range(0, sequences.shape[0], self.batch_size)
        ]
        return torch.cat(out).float().cpu()[order.argsort()]
