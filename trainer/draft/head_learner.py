"""Training an EAGLE-style draft head (`drafting.model.head.DraftHead`): on the actor's samples, with the actor's
features as input (teacher forcing) and two losses, top-k KL to the actor's next-token distribution
(`trainer.draft.distill.draft_loss`) and EAGLE's smooth-L1 regression of the actor's feature, which keeps the
head's own features usable one level down."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from drafting.model.head import DraftHead
from trainer.draft.distill import acceptance_probability, draft_loss, sample_candidates


@torch.no_grad()
def actor_features(actor, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The actor's features [B, T, H] (final hidden states after the last norm: what its LM head reads)."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = actor.model(input_ids=sequences, attention_mask=attention_mask, position_ids=positions, use_cache=False)
    return out.last_hidden_state


@dataclass
class HeadBatch:
    """Sequences with the actor's features; `learn` [B, T] marks positions whose next token is real (what the
    head is trained to predict there)."""

    sequences: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    feats: torch.Tensor  # [B, T, H]
    learn: torch.Tensor  # [B, T] bool
    # the actor's top-k next-token log-probs and ids [B, T, k] at every position, when cached once
    # (HeadLearner.cache_teacher) rather than recomputed from the features at each step
    top_logp: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.sequences.shape[0]

    def rows(self, idx) -> "HeadBatch":
        return self.map(lambda t: t[idx])

    def map(self, f) -> "HeadBatch":
        """The batch with f applied to each [B, T, ...] tensor (rows, columns)."""
        return HeadBatch(*(None if t is None else f(t) for t in (self.sequences, self.attention_mask, self.feats,
                                                                   self.learn, self.top_logp, self.top_ids)))


def head_batch(actor, sequences: torch.Tensor, attention_mask: torch.Tensor, learn: torch.Tensor | None = None,
               feats: torch.Tensor | None = None, chunk: int = 16) -> HeadBatch:
    """Features of the actor over the sequences (unless given). learn: default every position followed by a real
    token (prompt and response)."""
    if feats is None:
        feats = torch.cat([actor_features(actor, sequences[i:i + chunk], attention_mask[i:i + chunk])
                           for i in range(0, len(sequences), chunk)])
    if learn is None:
        m = attention_mask.bool()
        learn = torch.zeros_like(m)
        learn[:, :-1] = m[:, :-1] & m[:, 1:]
    return HeadBatch(sequences, attention_mask, feats.float(), learn.bool())


def head_outputs(head: DraftHead, batch: HeadBatch) -> torch.Tensor:
    """Predicted features [B, T, H] under teacher forcing (each position reads the actor's previous feature)."""
    prev = torch.cat([torch.zeros_like(batch.feats[:, :1]), batch.feats[:, :-1]], dim=1)
    return head(batch.sequences, prev.to(head.fc.weight.dtype), batch.attention_mask)


class HeadLearner:
    """The head, its AdamW, and distillation passes over batches of actor samples with their features."""

    warmup = 8

    def __init__(self, head: DraftHead, lr: float = 3e-4, temperature: float = 1.0, top_k: int = 64,
                 feature_weight: float = 0.1, batch_size: int = 8, max_norm: float = 1.0, vocab_sample: int = 2048):
        self.head, self.lr, self.top_k = head, lr, top_k
        self.temperature = temperature if temperature > 1e-3 else 1.0
        self.feature_weight, self.batch_size, self.max_norm = feature_weight, batch_size, max_norm
        self.vocab_sample = vocab_sample  # sampled softmax (as the draft model's) where V > 4x this; 0: never
        self.optimizer = torch.optim.AdamW(head.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
        self.updates = 0

    def loss(self, batch: HeadBatch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Top-k KL to the actor's next-token distribution (a sampled softmax over the vocabulary when it is
        large: the student's LM head is most of a step's cost) plus feature regression."""

        pred = head_outputs(self.head, batch)[batch.learn]  # [N, H]
        target = batch.feats[batch.learn]  # [N, H]
        if batch.top_logp is not None:
            top_logp, top_ids = batch.top_logp[batch.learn], batch.top_ids[batch.learn]
        else:
            top_logp, top_ids = self.teacher(target)
        vocab = self.head.actor_config.vocab_size
        if generator is not None and 0 < self.vocab_sample and 4 * self.vocab_sample < vocab:
            ids, log_w, top_ids = sample_candidates(top_ids, vocab, self.vocab_sample, generator)
            student = F.linear(pred, self.head.lm_rows(ids.to(pred.device))).float() / self.temperature
            student = student + log_w.to(pred.device)  # each sampled row stands for (V - u) / m of the rest
        else:
            student = self.head.logits(pred) / self.temperature
        kl = draft_loss(student, "kl_topk", topk_logprobs=top_logp, topk_ids=top_ids)
        feat = F.smooth_l1_loss(pred.float(), target.float())
        return kl + self.feature_weight * feat, {"kl": kl.item(), "feature": feat.item(), "tokens": len(target)}

    @torch.no_grad()
    def teacher(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The actor's top-k next-token log-probs and ids [..., k] from its features [..., H]."""
        logp = torch.log_softmax(self.head.logits(feats).float() / self.temperature, dim=-1)
        return logp.topk(min(self.top_k, logp.shape[-1]), dim=-1)

    def cache_teacher(self, batch: HeadBatch, rows: int = 8) -> HeadBatch:
        """The batch with its teacher computed once (a full LM-head pass per position) for every epoch after."""
        parts = [self.teacher(batch.feats[i:i + rows]) for i in range(0, batch.size, rows)]
        return HeadBatch(batch.sequences, batch.attention_mask, batch.feats, batch.learn,
                         torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    def train(self, batch: HeadBatch, seed: int, steps: int | None = None, deadline: float = float("inf"),
              should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
        """Seeded passes over the rows in minibatches of similar length; `steps` optimizer steps (default one
        pass), fewer if time.perf_counter() passes `deadline` or `should_stop()`, asked before each step, says so
        (the online draft trainer's stop with the policy update). Returns mean losses and tokens seen."""
        if batch.size == 0:
            return {"loss": 0.0, "kl": 0.0, "feature": 0.0, "tokens": 0.0, "steps": 0.0}
        g = torch.Generator().manual_seed(seed)
        lengths = batch.attention_mask.sum(1)
        per_pass = -(-batch.size // self.batch_size)
        steps = per_pass if steps is None else steps
        self.head.train()
        out = {"loss": 0.0, "kl": 0.0, "feature": 0.0, "tokens": 0.0}
        done = 0
        while done < steps:
            order = torch.randperm(batch.size, generator=g)
            order = order[lengths[order].argsort(stable=True)]  # similar lengths together: little padding
            groups = list(order.split(self.batch_size))
            for i in torch.randperm(len(groups), generator=g).tolist():
                if done >= steps or time.perf_counter() > deadline or (should_stop is not None and should_stop()):
                    steps = done
                    break
                mb = _trim(batch.rows(groups[i]))
                loss, parts = self.loss(mb, g)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.max_norm)
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr * min(1.0, (self.updates + 1) / self.warmup)
                self.optimizer.step()
                self.updates += 1
                done += 1
                out["loss"] += loss.item()
                out["kl"] += parts["kl"]
                out["feature"] += parts["feature"]
                out["tokens"] += parts["tokens"]
        self.head.eval()
        return {**{k: v / max(done, 1) for k, v in out.items() if k != "tokens"}, "tokens": out["tokens"],
                "steps": float(done)}

    def state_dict(self) -> dict:
        return {"model": self.head.state_dict(), "optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])


def _trim(b: HeadBatch) -> HeadBatch:
    """Drop columns that are padding in every row (left padding of prompts, right padding of responses)."""
    cols = b.attention_mask.bool().any(0).nonzero().squeeze(1)
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    return b.map(lambda t: t[:, lo:hi])


@torch.no_grad()
def head_scores(head: DraftHead, batch: HeadBatch, temperature: float, chunk: int = 8,
                mask: torch.Tensor | None = None) -> dict[str, float]:
    """Held-out acceptance probability (sum_x min(p, q)) and top-1 agreement of the head against the actor, at
    the positions `mask` [B, T] (default batch.learn), the head reading the actor's features (one level)."""

    head.eval()
    temperature = temperature if temperature > 1e-3 else 1.0
    mask = batch.learn if mask is None else mask
    accept, agree, n = 0.0, 0, 0
    for i in range(0, batch.size, chunk):
        mb = batch.rows(slice(i, i + chunk))
        m = mask[i:i + chunk]
        if not m.any():
            continue
        q = head.logits(head_outputs(head, mb)[m]) / temperature
        p = head.logits(mb.feats[m]) / temperature
        accept += float(acceptance_probability(p, q).sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        n += int(m.sum())
    return {"acceptance": accept / max(n, 1), "top1_agreement": agree / max(n, 1), "positions": n}
