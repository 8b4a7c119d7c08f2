"""Draft distillation toward the actor: the one loss and the one training loop that online adaptation
(`actors/draft_trainer.py`, every RLHF iteration) and `python -m trainer.distill_draft` (offline) share.

The data is an `Experience` (sequences, masks and, for `kl_topk`, the actor's top-k log-probs per response
position from `experience.sequence_logprobs_topk`); the draft learns at the response positions only.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable

import torch
import torch.nn.functional as F

from configs.schema import DRAFT_LOSSES as LOSSES
from configs.schema import DraftConfig
from trainer.core.experience import Experience, position_ids_from_mask, response_logits, trim_padding


def draft_loss(student_logits: torch.Tensor, kind: str, tokens: torch.Tensor | None = None,
               topk_logprobs: torch.Tensor | None = None, topk_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over N response positions; student_logits [N, V] already divided by the rollout temperature.

    kl_topk: forward KL(actor || draft) over k + 1 outcomes, the actor's top-k tokens (topk_logprobs,
    topk_ids [N, k]) and the rest of the vocabulary as one tail bucket; with k = V it is the full KL.
    ce_sampled: cross-entropy of the sampled tokens [N], a one-sample estimate of the same KL (plus H(actor)).
    A sampled softmax passes logits over C candidate tokens instead, each plus its log-weight (how many tokens
    it stands for), and topk_ids indexing those columns: the same formula then estimates the full one.
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


def sample_candidates(topk_ids: torch.Tensor, vocab: int, sample: int, generator: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vocabulary rows a sampled-softmax step scores: every top-k token of the minibatch (weight 1) and
    `sample` of the others drawn uniformly (each standing for (V - u) / sample tokens). Returns the candidate ids
    [C], their log-weights [C] and topk_ids [N, k] as indices into the candidates."""
    top, local = topk_ids.unique(return_inverse=True)  # [u], [N, k]
    perm = torch.randperm(vocab, generator=generator)
    rest = perm[~torch.isin(perm, top)][:sample]  # [m]
    stands_for = (vocab - len(top)) / len(rest) if len(rest) else 1.0
    log_w = torch.cat([torch.zeros(len(top)), torch.full((len(rest),), math.log(stands_for))])
    return torch.cat([top, rest]), log_w, local


def response_hidden(model: torch.nn.Module, batch: Experience) -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden states [b, R', H] that predict the response tokens, and those tokens [b, R'] (the LM head
    left out: the caller applies it to the vocabulary rows it needs)."""
    seqs, attn, num_actions = trim_padding(batch.sequences, batch.attention_mask, batch.num_actions)
    out = model.base_model(input_ids=seqs, attention_mask=attn, position_ids=position_ids_from_mask(attn),
                           use_cache=False)
    return out.last_hidden_state[:, -num_actions - 1:-1], seqs[:, -num_actions:]


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
        head, config = model.get_output_embeddings(), model.config
        plain_head = (isinstance(head, torch.nn.Linear) and getattr(config, "final_logit_softcapping", None) is None
                      and getattr(config, "logit_scale", None) is None)
        # sampled softmax where the vocabulary dwarfs the sample (a plain linear head only); else the full softmax
        self.sampled = (cfg.loss == "kl_topk" and cfg.vocab_sample > 0 and plain_head
                        and head.out_features > 4 * cfg.vocab_sample)

    def train(self, batch: Experience, seed: int, steps: int | None = None,
              should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
        """Up to `steps` (default cfg.steps) optimizer steps, each on `cfg.batch_size` rows of similar length, in
        seeded passes over the batch; `should_stop()`, asked before each step, ends it early. Returns the mean
        loss before each step, the steps done, the response tokens seen and (kl_topk) the acceptance measured on
        the first pass, before the draft trained on those rows."""
        steps = self.cfg.steps if steps is None else steps
        if batch.batch_size == 0 or steps <= 0:  # nothing to learn from (and the passes would never yield)
            return {"loss": 0.0, "tokens": 0.0, "steps": 0.0}
        if self.cfg.loss == "kl_topk" and batch.topk_logprobs is None:
            raise ValueError("draft.loss=kl_topk needs the actor's top-k log-probs (Experience.topk_logprobs)")
        first_pass = math.ceil(batch.batch_size / self.cfg.batch_size)
        passes = (batch.minibatches(self.cfg.batch_size, shuffle_seed=seed + n, group_by_length=True)
                  for n in itertools.count())
        generator = torch.Generator().manual_seed(seed)  # the sampled softmax's candidates: resume-exact
        self.model.train()
        losses, tokens, accept, positions = [], 0, 0.0, 0
        for i, mb in enumerate(itertools.islice(itertools.chain.from_iterable(passes), steps)):
            if should_stop is not None and should_stop():
                break
            logits, targets, topk = self._student(mb, generator)
            if logits is None:
                continue
            loss = draft_loss(logits, self.cfg.loss, tokens=targets, **topk)
            if topk and i < first_pass:  # sum over the top-k of min(p, q): a lower bound of sum_x min(p, q)
                with torch.no_grad():
                    q = logits.float().log_softmax(-1).gather(1, topk["topk_ids"]).exp()
                    accept += float(torch.minimum(topk["topk_logprobs"].float().exp(), q).sum())
                    positions += len(q)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
            for group in self.optimizer.param_groups:
                group["lr"] = self.cfg.lr * min(1.0, (self.updates + 1) / self.warmup)
            self.optimizer.step()
            self.updates += 1
            losses.append(loss.item())
            tokens += len(targets)
        self.model.eval()
        metrics = {"loss": sum(losses) / max(len(losses), 1), "tokens": float(tokens), "steps": float(len(losses))}
        if positions:
            metrics["acceptance"] = accept / positions
        return metrics

    def _student(self, mb: Experience, generator: torch.Generator):
        """The draft's logits / temperature at the minibatch's response positions [N, V] (or, sampled softmax,
        [N, C] over the candidates, log-weights added), the response tokens [N] and the top-k teacher with its
        ids indexing those columns; (None, None, None) when no position is a response token."""
        if not self.sampled:
            logits, targets = response_logits(self.model, mb.sequences, mb.attention_mask, mb.num_actions,
                                              self.temperature)  # [b, R', V], [b, R']
        else:
            logits, targets = response_hidden(self.model, mb)  # [b, R', H]
        kept = targets.shape[1]
        mask = mb.action_mask[:, :kept].bool()
        if not mask.any():
            return None, None, None
        logits, targets = logits[mask], targets[mask]  # [N, V] or [N, H], [N]
        if self.cfg.loss != "kl_topk":
            return logits, targets, {}
        topk = {"topk_logprobs": mb.topk_logprobs[:, :kept][mask], "topk_ids": mb.topk_ids[:, :kept][mask]}
        if self.sampled:
            head = self.model.get_output_embeddings()
            ids, log_w, topk["topk_ids"] = sample_candidates(topk["topk_ids"], head.out_features,
                                                             self.cfg.vocab_sample, generator)
            weight = head.weight[ids.to(head.weight.device)]  # [C, H]
            logits = F.linear(logits, weight, None if head.bias is None else head.bias[ids])  # [N, C]
            logits = logits.float() / self.temperature + log_w.to(logits.device)
        return logits, targets, topk

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
