"""Draft distillation toward the actor: the one loss and the one training loop that online adaptation
(`actors/draft_trainer.py`, every RLHF iteration) and `python -m trainer.distill_draft` (offline) share.

The data is an `Experience` (sequences, masks and, for `kl_topk`, the actor's top-k log-probs per response
position from `experience.sequence_logprobs_topk`); the draft learns at the response positions only.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from configs.schema import DRAFT_LOSSES as LOSSES
from configs.schema import DraftConfig
from trainer.experience import Experience, response_logits


def draft_loss(student_logits: torch.Tensor, kind: str, tokens: torch.Tensor | None = None,
               topk_logprobs: torch.Tensor | None = None, topk_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over N response positions; student_logits [N, V] already divided by the rollout temperature.

    kl_topk: forward KL(actor || draft) over k + 1 outcomes, the actor's top-k tokens (topk_logprobs,
    topk_ids [N, k]) and the rest of the vocabulary as one tail bucket; with k = V it is the full KL.
    ce_sampled: cross-entropy of the sampled tokens [N], a one-sample estimate of the same KL (plus H(actor)).
    """
    logq = F.log_softmax(student_logits.float(), dim=-1)  # [N, V]
    if kind == "ce_sampled":
        return -logq.gather(1, tokens[:, None]).mean()
    if kind != "kl_topk":
        raise ValueError(f"draft loss {kind!r} is not one of {', '.join(LOSSES)}")
    logp = topk_logprobs.float()  # [N, k]
    logq_k = logq.gather(1, topk_ids)  # [N, k]
    kl = (logp.exp() * (logp - logq_k)).sum(-1)  # [N]
    if topk_ids.shape[1] < logq.shape[1]:
        p_tail = (1.0 - logp.exp().sum(-1)).clamp(min=0.0)  # [N]
        logq_tail = logq.scatter(1, topk_ids, float("-inf")).logsumexp(-1)  # log of the draft's mass off the top-k
        kl = kl + torch.xlogy(p_tail, p_tail) - p_tail * logq_tail
    return kl.mean()


@torch.no_grad()
def acceptance_probability(actor_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """sum_x min(p(x), q(x)) per position [N]: the chance that speculative sampling accepts one drafted token
    (1 - total variation distance). Logits [N, V], temperature already applied."""
    return torch.minimum(actor_logits.float().softmax(-1), draft_logits.float().softmax(-1)).sum(-1)


class DraftLearner:
    """The draft model, its AdamW and the distillation pass over one batch of actor samples."""

    # Adam's first steps move every weight by about lr whatever its gradient: on a draft that is already good
    # that undoes its distillation before the moments settle, so the learning rate ramps up over these steps.
    warmup = 8

    def __init__(self, model: torch.nn.Module, cfg: DraftConfig, temperature: float, max_norm: float = 1.0):
        if cfg.loss not in LOSSES:
            raise ValueError(f"draft.loss: {cfg.loss!r} is not one of {', '.join(LOSSES)}")
        self.model, self.cfg, self.max_norm = model, cfg, max_norm
        # greedy rollouts (temperature 0) still train the draft on a proper distribution: temperature 1
        self.temperature = temperature if temperature > 1e-3 else 1.0
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)
        self.updates = 0  # optimizer steps so far (checkpointed)

    def train(self, batch: Experience, seed: int) -> dict[str, float]:
        """`cfg.steps` optimizer steps, each on `cfg.batch_size` rows of similar length, in seeded passes over the
        batch. Returns the mean loss before each step and the response tokens seen."""
        if batch.batch_size == 0:  # nothing to learn from (and the passes below would never yield a minibatch)
            return {"loss": 0.0, "tokens": 0.0, "steps": 0.0}
        if self.cfg.loss == "kl_topk" and batch.topk_logprobs is None:
            raise ValueError("draft.loss=kl_topk needs the actor's top-k log-probs (Experience.topk_logprobs)")
        passes = (batch.minibatches(self.cfg.batch_size, shuffle_seed=seed + n, group_by_length=True)
                  for n in itertools.count())
        self.model.train()
        losses, tokens = [], 0
        for mb in itertools.islice(itertools.chain.from_iterable(passes), self.cfg.steps):
            logits, targets = response_logits(self.model, mb.sequences, mb.attention_mask, mb.num_actions,
                                              self.temperature)  # [b, R', V], [b, R']
            kept = targets.shape[1]
            mask = mb.action_mask[:, :kept].bool()
            if not mask.any():
                continue
            topk = {}
            if self.cfg.loss == "kl_topk":
                topk = {"topk_logprobs": mb.topk_logprobs[:, :kept][mask], "topk_ids": mb.topk_ids[:, :kept][mask]}
            loss = draft_loss(logits[mask], self.cfg.loss, tokens=targets[mask], **topk)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
            for group in self.optimizer.param_groups:
                group["lr"] = self.cfg.lr * min(1.0, (self.updates + 1) / self.warmup)
            self.optimizer.step()
            self.updates += 1
            losses.append(loss.item())
            tokens += int(mask.sum())
        self.model.eval()
        return {"loss": sum(losses) / max(len(losses), 1), "tokens": float(tokens), "steps": float(len(losses))}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
