"""An EAGLE-style draft head: the draft kind beside the small model.

One decoder layer reads the token's embedding together with the actor's own final hidden state (its feature)
at the previous position, concat(embed(token_t), f_{t-1}) -> fc 2H -> H -> one decoder layer -> f'_t, and the
actor's LM head turns f'_t into the next token's logits (EAGLE-1: no norm after the layer; the actor's feature is
post-norm). Embedding, LM head and RoPE are the actor's, read live: a head directory stores its fc and layer only
(`head.safetensors`) and a config naming its kind (`head.json`), so loading one needs the actor.

In the engine (`HeadDecoder`) the feature at a committed position is the target's own, kept by its verify and
prefill forwards (`KVCache.feat`); inside a draft tree a node reads the feature the head predicted for its
parent. Acceptance never looks at the draft, so losslessness does not depend on any of this.

Training (`DraftHead`, `HeadLearner`): on the actor's samples, with the actor's features as input (teacher
forcing) and two losses, top-k KL to the actor's next-token distribution (`trainer.distill.draft_loss`) and
EAGLE's smooth-L1 regression of the actor's feature, which keeps the head's own features usable one level down.
"""
from __future__ import annotations

import copy
import importlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from drafting.model import EagerOps, LeanDecoder, layer_params

KIND = "eagle_head"
CONFIG_FILE = "head.json"
WEIGHTS_FILE = "head.safetensors"
_LAYER_CLASS = {"llama": "LlamaDecoderLayer", "qwen2": "Qwen2DecoderLayer", "qwen3": "Qwen3DecoderLayer",
                "mistral": "MistralDecoderLayer"}


def head_supports(model_type: str) -> bool:
    """Whether a head (and the engine's feature buffer) covers this architecture."""
    return model_type in _LAYER_CLASS


def is_head_dir(path) -> bool:
    """A draft head directory (vs an HF model directory): it has head.json."""
    return isinstance(path, (str, Path)) and (Path(path) / CONFIG_FILE).is_file()


def draft_kind(path) -> str:
    """'head' for a draft head directory, 'model' for anything else (an HF causal LM)."""
    return "head" if is_head_dir(path) else "model"


def draft_config(path, actor_config):
    """The HF config a draft sizes like, whatever its kind: a head's (`head_config`), or a model's own."""
    if is_head_dir(path):
        return head_config(path, actor_config)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def _actor_config(actor_config):
    """An HF config object from a config or its dict (as head.json stores it)."""
    if isinstance(actor_config, dict):
        from transformers import AutoConfig

        d = dict(actor_config)
        return AutoConfig.for_model(d.pop("model_type"), **d)
    return actor_config


def head_config(path, actor_config):
    """The HF config a head directory sizes like (the actor's, one layer), checked against the actor's; errors
    name the file."""
    try:
        meta = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"draft head {Path(path) / CONFIG_FILE}: cannot read it: {e}") from e
    if meta.get("kind") != KIND:
        raise ValueError(f"draft head {Path(path) / CONFIG_FILE}: kind {meta.get('kind')!r} is not {KIND!r}")
    mine = meta.get("actor_config", {})
    for key in ("hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads", "model_type"):
        if mine.get(key) != getattr(actor_config, key, None):
            raise ValueError(f"draft head {Path(path) / CONFIG_FILE}: {key} {mine.get(key)!r} does not match the "
                             f"actor's {getattr(actor_config, key, None)!r} (a head of another actor?)")
    cfg = copy.deepcopy(actor_config)
    cfg.num_hidden_layers = 1
    return cfg


class DraftHead(torch.nn.Module):
    """The trainable head (fc + one HF decoder layer of the actor's architecture). The actor's embedding, LM head
    and rotary module are lent by `bind` and are not parameters: they are not trained or saved here."""

    def __init__(self, actor_config):
        super().__init__()
        cfg = copy.deepcopy(_actor_config(actor_config))
        if cfg.model_type not in _LAYER_CLASS:
            raise ValueError(f"draft head: model_type {cfg.model_type!r} is not supported (want one of "
                             f"{tuple(_LAYER_CLASS)})")
        cfg._attn_implementation = "sdpa"
        self.actor_config = cfg
        H = cfg.hidden_size
        module = importlib.import_module(f"transformers.models.{cfg.model_type}.modeling_{cfg.model_type}")
        self.fc = torch.nn.Linear(2 * H, H, bias=True)
        self.layer = getattr(module, _LAYER_CLASS[cfg.model_type])(cfg, layer_idx=0)
        self._lent = None

    @classmethod
    def from_actor(cls, actor, seed: int = 0) -> "DraftHead":
        """A fresh head for this HF actor: the layer starts as a copy of the actor's last decoder layer, fc as
        [0 | I] (the feature passes through): a head that starts from the actor's own late computation."""
        head = cls(actor.config)
        torch.manual_seed(seed)
        last = actor.model.layers[-1].state_dict()
        head.layer.load_state_dict(last)
        H = actor.config.hidden_size
        with torch.no_grad():
            head.fc.weight.zero_()
            head.fc.weight[:, H:].copy_(torch.eye(H))
            head.fc.weight[:, :H].normal_(0, 0.02)
            head.fc.bias.zero_()
        return head.bind(actor)

    def bind(self, actor) -> "DraftHead":
        """Read embeddings, LM head and RoPE from this HF actor (the current ones, whatever they become)."""
        self._lent = (actor.get_input_embeddings(), actor.get_output_embeddings(), actor.model.rotary_emb)
        return self

    def forward(self, tokens: torch.Tensor, prev_feats: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Predicted features [B, T, H]: position t reads tokens[:, t] and prev_feats[:, t] (the actor's feature at
        t - 1). attention_mask [B, T] (left padding allowed)."""
        if self._lent is None:
            raise RuntimeError("DraftHead: bind(actor) first (the head reads the actor's embeddings and LM head)")
        embed, _, rotary = self._lent
        B, T = tokens.shape
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        x = self.fc(torch.cat([embed(tokens).detach(), prev_feats], dim=-1))  # [B, T, H]
        cos, sin = rotary(x, positions)
        keep = attention_mask.bool()
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        mask = causal[None] & keep[:, None, :]  # [B, T, T]
        mask = mask | torch.eye(T, dtype=torch.bool, device=x.device)[None]  # padded queries see themselves
        out = self.layer(x, attention_mask=mask[:, None], position_ids=positions, position_embeddings=(cos, sin))
        return out[0] if isinstance(out, tuple) else out

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """The actor's LM head on (predicted) features."""
        return F.linear(feats, self._lent[1].weight.detach())

    def lm_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The actor's LM-head rows [C, H] for token ids [C] (a sampled softmax scores only those)."""
        return self._lent[1].weight.detach()[ids]

    def save(self, path) -> Path:
        """head.json (kind + the actor's config) and head.safetensors (fc and layer only)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, path / WEIGHTS_FILE)
        (path / CONFIG_FILE).write_text(json.dumps({"kind": KIND, "actor_config": self.actor_config.to_dict()},
                                                   indent=1, default=str))
        return path


def actor_shell(actor_path, dtype: torch.dtype = torch.float32):
    """The actor without its decoder layers: embedding, final norm, LM head and rotary module, all that a head
    borrows (`bind`), at a fraction of the actor's memory; only those tensors are read from its files."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(actor_path)
    config.num_hidden_layers = 0
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = []
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the layers' tensors are left out on purpose: no load report of them
    hf_logging.disable_progress_bar()
    try:
        shell = AutoModelForCausalLM.from_pretrained(actor_path, config=config, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    return shell.eval().requires_grad_(False)


def load_head(path, actor=None) -> DraftHead:
    """A saved head (bound to `actor` when given). Errors name the file."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"draft head {path / CONFIG_FILE}: cannot read it: {e}") from e
    if meta.get("kind") != KIND:
        raise ValueError(f"draft head {path / CONFIG_FILE}: kind {meta.get('kind')!r} is not {KIND!r}")
    cfg = meta["actor_config"]
    cfg = {k: v for k, v in cfg.items() if k not in ("transformers_version", "architectures", "_name_or_path")}
    head = DraftHead(cfg)
    try:
        head.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"draft head {path / WEIGHTS_FILE}: {e}") from e
    if actor is not None:
        if actor.config.hidden_size != head.actor_config.hidden_size:
            raise ValueError(f"draft head {path}: hidden_size {head.actor_config.hidden_size} does not match the "
                             f"actor's {actor.config.hidden_size}")
        head.bind(actor)
    return head.eval()


# ---- the engine's form -------------------------------------------------------------------------------------------
class HeadDecoder(LeanDecoder):
    """The head as a one-layer LeanDecoder whose embedding, LM head and RoPE tables are the target decoder's own
    tensors (weight sync updates them in place, so the head always reads the current actor). forward takes
    `feats` [B, T, H], the feature at each token's previous position."""

    kind = "head"

    def __init__(self, head, target: LeanDecoder, what: str = "draft head"):
        """head: a head directory, a `DraftHead`, or its state dict."""
        if isinstance(head, (str, Path)):
            head = load_head(head)
        sd = head.state_dict() if isinstance(head, torch.nn.Module) else head
        self.what = what
        self.target = target
        self.config = copy.deepcopy(target.config)
        self.config.num_hidden_layers = 1
        self.generation_config = None
        self.shape = replace(target.shape, layers=1)
        self.device, self.dtype = target.device, target.dtype
        self.ops = EagerOps
        self.attention = "sdpa"
        self.embed, self.lm_head, self.norm = target.embed, target.lm_head, None
        self.cos, self.sin, self.sin_signed = target.cos, target.sin, target.sin_signed
        H = self.shape.hidden
        if "fc.weight" not in sd or tuple(sd["fc.weight"].shape) != (H, 2 * H):
            raise ValueError(f"{what}: fc.weight missing or not [{H}, {2 * H}] (a head of another actor?)")
        self.fc = torch.zeros(H, 2 * H, device=self.device, dtype=self.dtype)
        self.fc_b = torch.zeros(H, device=self.device, dtype=self.dtype)
        w, names = layer_params(sd, "layer.", self.shape, self.device, self.dtype)
        self.layers = [w]
        self.views = {"fc.weight": self.fc, "fc.bias": self.fc_b, **names}
        self.load_weights(sd, strict=True)

    def inputs(self, tokens: torch.Tensor, feats: torch.Tensor | None) -> torch.Tensor:
        if feats is None:
            raise ValueError(f"{self.what}: forward needs the actor's features (feats)")
        return F.linear(torch.cat([self.embed[tokens], feats], dim=-1), self.fc, self.fc_b)

    def final(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + residual
        return x, x  # no norm: the predicted feature is what the LM head reads


# ---- training ----------------------------------------------------------------------------------------------------
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
        from trainer.distill import draft_loss, sample_candidates

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
    from trainer.distill import acceptance_probability

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
