"""A draft head's online adaptation: the draft trainer's learner when model.draft is a head (drafting/head.py).

The head learns from each rollout with the old policy's features (`Experience.features`, from the old-logprob
pass): teacher forcing on the actor's features, the teacher being the actor's LM head on them, the loss
`HeadLearner`'s (top-k KL + feature regression) at the positions that predict response tokens, as a draft
model learns them.

Embedding and LM head: the policy trains every parameter, those two included, and on the instances a head reads
the target's own tensors, which each weight push updates (`HeadDecoder`). A copy frozen at the start would drift
from both: the teacher LM_head(feature) would no longer be the actor's distribution, and the head would learn to
read an embedding it never meets. So the trainer keeps the actor's current ones: it takes part in every push of
the actor's weights anyway (actors/weight_sync.py) and keeps these tensors instead of dropping them. After the
push that ends iteration i - 1 they are the weights that decoded rollout i and computed its features, the rollout
the trainer learns from during iteration i's update: embedding, LM head and features all of one actor. They are
borrowed, never trained or sent back; RoPE is the config's and does not move.
"""
from __future__ import annotations

from typing import Callable

import torch

from configs.schema import DraftConfig
from drafting.model.head import actor_shell, load_head
from trainer.draft.head_learner import HeadBatch, HeadLearner
from trainer.core.experience import Experience


def head_batch_of(experience: Experience) -> HeadBatch:
    """The rollout as a head's batch: the head at position t reads token t and the feature at t - 1 and learns the
    token at t + 1, so it learns at [P - 1, T - 1) where the next token is a response token. Rows without one
    are left out (their loss would be empty)."""
    if experience.features is None:
        raise ValueError("a draft head learns from the old policy's features (Experience.features): the old-logprob "
                         "pass must return them (compute_logprobs_features)")
    learn = torch.zeros_like(experience.attention_mask, dtype=torch.bool)
    P = experience.sequences.shape[1] - experience.num_actions
    learn[:, P - 1:-1] = experience.action_mask.bool()
    rows = learn.any(1)
    return HeadBatch(experience.sequences[rows], experience.attention_mask[rows],
                     experience.features[rows].float(), learn[rows])


class HeadOnline:
    """A head, the actor's borrowed embedding / LM head / rotary (`actor_shell`) and a `HeadLearner`, with the
    draft model learner's interface (`trainer.distill.DraftLearner`): train on an Experience, state dicts,
    `model` (what is sent to the instances: fc and the layer only)."""

    def __init__(self, head_path: str, actor_path: str, cfg: DraftConfig, temperature: float,
                 device: torch.device | str = "cpu"):
        self.shell = actor_shell(actor_path).to(device)
        self.model = load_head(head_path, self.shell).to(device)
        self.learner = HeadLearner(self.model, lr=cfg.lr, temperature=temperature, top_k=cfg.top_k,
                                   batch_size=cfg.batch_size, vocab_sample=cfg.vocab_sample)
        self._actor = dict(self.shell.named_parameters(remove_duplicate=False))  # tied LM head: one tensor

    @property
    def updates(self) -> int:
        return self.learner.updates

    def train(self, batch: Experience, seed: int, steps: int, should_stop: Callable[[], bool] | None = None
              ) -> dict[str, float]:
        """Up to `steps` optimizer steps over the rollout; `should_stop()`, asked before each step, ends it early."""
        if steps <= 0:
            return {"loss": 0.0, "tokens": 0.0, "steps": 0.0}
        return self.learner.train(head_batch_of(batch), seed, steps=steps, should_stop=should_stop)

    def load_actor_tensor(self, name: str, tensor: torch.Tensor) -> bool:
        """Keep one of the actor's tensors (by HF name) if the head borrows it; False for any other."""
        mine = self._actor.get(name.removeprefix("module."))
        if mine is None:
            return False
        with torch.no_grad():
            mine.copy_(tensor.to(mine.device, mine.dtype))
        return True

    def state_dict(self) -> dict:
        return self.learner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.learner.load_state_dict(state)
