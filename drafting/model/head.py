"""An EAGLE-style draft head: the draft kind beside the small model.

One decoder layer reads the token's embedding together with the actor's own final hidden state (its feature)
at the previous position, concat(embed(token_t), f_{t-1}) -> fc 2H -> H -> one decoder layer -> f'_t, and the
actor's LM head turns f'_t into the next token's logits (EAGLE-1: no norm after the layer; the actor's feature is
post-norm). Embedding, LM head and RoPE are the actor's, read live: a head directory stores its fc and layer only
(`head.safetensors`) and a config naming its kind (`head.json`), so loading one needs the actor.

In the engine (`HeadDecoder`) the feature at a committed position is the target's own, kept by its verify and
prefill forwards (`KVCache.feat`); inside a draft tree a node reads the feature the head predicted for its
parent. Acceptance never looks at the draft, so losslessness does not depend on any of this.

Training lives above the engine, in `trainer/draft/head_learner.py`.
"""
from __future__ import annotations

import copy
import importlib
import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from drafting.model.decoder import EagerOps, LeanDecoder, layer_params

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
