"""Lean decoder forward (gpt-fast style) over the weights of an HF Llama-family model (Llama, Qwen2, Qwen3, Mistral).

One function does a forward over [B, T] new tokens against a per-slot KV cache read in place (per-row visible
prefix + a tail mask, `drafting.attention`), so the same code serves prefill, plain decoding, draft-tree
expansion and tree verification, eagerly on CPU and under CUDA graphs on a GPU."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

import torch
import torch.nn.functional as F

from drafting.model.attention import Attention

if TYPE_CHECKING:  # the cache is passed in: the runtime owns it
    from drafting.runtime.kv_cache import KVCache

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def load_hf_causal_lm(model_or_path, dtype: torch.dtype, what: str):
    """An HF CausalLM from a path (loaded on CPU) or a model object as given."""
    if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_pretrained(str(model_or_path), dtype=dtype)
        except OSError as e:
            raise ValueError(f"{what}: cannot load an HF causal LM from {model_or_path!r}: {e}") from e
    if not hasattr(model_or_path, "config") or not hasattr(model_or_path, "state_dict"):
        raise TypeError(f"{what}: expected a path or an HF model, got {type(model_or_path).__name__}")
    return model_or_path


@dataclass
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    eps: float


class LeanDecoder:
    """Fused weights (qkv, gate_up) copied from an HF model; `load_weights` takes HF parameter names."""

    def __init__(self, model_or_path, device, dtype: torch.dtype, max_positions: int, max_len: int,
                 what: str = "model"):
        hf = load_hf_causal_lm(model_or_path, dtype, what)
        cfg = hf.config
        self.what = what
        self.config = cfg
        self.generation_config = getattr(hf, "generation_config", None)
        if cfg.model_type not in SUPPORTED:
            raise ValueError(f"{what}: model_type {cfg.model_type!r} is not supported (want one of {SUPPORTED})")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"{what}: hidden_act {cfg.hidden_act!r} is not supported (want 'silu')")
        window = getattr(cfg, "sliding_window", None)
        layer_types = getattr(cfg, "layer_types", None) or ["sliding_attention"] * cfg.num_hidden_layers
        if window is not None and "sliding_attention" in layer_types and window < max_len:
            raise ValueError(f"{what}: sliding_window={window} < max_len={max_len}; sliding-window attention "
                             f"is not implemented, use max_len <= {window}")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.shape = ModelShape(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                                cfg.num_key_value_heads, head_dim, cfg.vocab_size, cfg.rms_norm_eps)
        self.device, self.dtype = torch.device(device), dtype
        self.ops = EagerOps
        self.attention = "sdpa"  # the engine sets the backend (drafting.attention) it resolved for this model
        self._build_params(hf)
        self._build_rope(hf, max_positions)

    # ---- weights -------------------------------------------------------------------------------------------
    def _build_params(self, hf) -> None:
        """Allocate fused tensors and a view per HF parameter name, then copy the HF weights in."""
        s, dev, dt = self.shape, self.device, self.dtype
        sd = hf.state_dict()
        z = lambda *shape: torch.zeros(*shape, device=dev, dtype=dt)  # noqa: E731
        self.embed = z(s.vocab_size, s.hidden)
        self.norm = z(s.hidden)
        self.views: dict[str, torch.Tensor] = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        embed_ptr = sd["model.embed_tokens.weight"].data_ptr()
        tied = "lm_head.weight" not in sd or sd["lm_head.weight"].data_ptr() == embed_ptr
        self.lm_head = self.embed if tied else z(s.vocab_size, s.hidden)
        self.views["lm_head.weight"] = self.lm_head
        self.layers = []
        for i in range(s.layers):
            w, names = layer_params(sd, f"model.layers.{i}.", s, dev, dt)
            self.views.update(names)
            self.layers.append(w)
        self.load_weights(sd, strict=True)

    def _resolve(self, name: str) -> str | None:
        for cand in (name, name.removeprefix("module."), "model." + name.removeprefix("module.")):
            if cand in self.views:
                return cand
        return None

    @torch.inference_mode()
    def load_weights(self, named: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                     strict: bool = False) -> int:
        """Copy tensors given by HF parameter names into the fused weights; returns how many were loaded.

        strict: every weight must be given. Unknown names and shape mismatches are errors naming the parameter."""
        items = named.items() if isinstance(named, Mapping) else named
        seen = set()
        for name, t in items:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            key = self._resolve(name)
            if key is None:
                raise KeyError(f"{self.what}: unknown parameter {name!r} for this {self.config.model_type} model")
            dst = self.views[key]
            if tuple(dst.shape) != tuple(t.shape):
                raise ValueError(f"{self.what}: parameter {name!r} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(dst.shape)}")
            dst.copy_(t.detach().to(device=dst.device, dtype=dst.dtype))
            seen.add(key)
        if strict:
            optional = {"lm_head.weight"} if self.lm_head is self.embed else set()
            missing = [n for n in self.views if n not in seen and n not in optional]
            if missing:
                raise KeyError(f"{self.what}: missing parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
        return len(seen)

    def _build_rope(self, hf, max_positions: int) -> None:
        """cos/sin table from the HF model's own rotary module (same inv_freq, rope scaling, attention scaling)."""
        rot = hf.model.rotary_emb
        pos = torch.arange(max_positions, device=rot.inv_freq.device)[None]  # [1, P]
        probe = torch.zeros(1, dtype=self.dtype, device=rot.inv_freq.device)
        with torch.no_grad():
            cos, sin = rot(probe, pos)  # [1, P, D]
        self.cos = cos[0].to(self.device, self.dtype)  # [P, D]
        self.sin = sin[0].to(self.device, self.dtype)
        half = self.sin.shape[-1] // 2
        self.sin_signed = torch.cat([-self.sin[:, :half], self.sin[:, half:]], dim=-1)

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows: slice,
                write_pos: torch.Tensor, prefix: torch.Tensor, tail: torch.Tensor | None, kv_len: int,
                logits_at: torch.Tensor | None = None, want_logits: bool = True,
                valid: torch.Tensor | None = None, feats: torch.Tensor | None = None,
                return_hidden: bool = False):
        """Forward over new tokens of cache rows `rows` (B of them), attending to the cache in place.

        tokens, positions, write_pos: [B, T]. Each layer first writes the new K/V into the cache at columns
        write_pos, then attends: column j < kv_len of row b is visible to query t iff j < prefix[b] or
        (u = j - prefix[b]) < Tt and tail[b, t, u] (`drafting.attention`; tail [B, T, Tt] bool or None).
        logits_at [B, K]: token indices to project (default all). positions must lie inside the RoPE table.
        valid [B, T] bool (eager packing): only these tokens go through the projections and the MLP, in
        row-major order; padding costs attention only, and logits come back packed [N, V].
        feats [B, T, H]: the actor's features a draft head reads beside each token (`drafting.head`).
        A cache with a feature buffer (`KVCache.feat`) gets the final hidden state of every new token there.
        Returns logits [B, K, V] (or [N, V] packed) or None; with return_hidden, (logits, hidden [B, K, H])."""
        s = self.shape
        B, T = tokens.shape
        pack = None
        if valid is not None:
            pack = valid.reshape(-1).nonzero().squeeze(1)  # [N] positions of real tokens in the flat [B * T]
            tokens, positions = tokens.reshape(-1)[pack], positions.reshape(-1)[pack]  # [N]
        if feats is not None and pack is not None:
            feats = feats.reshape(-1, feats.shape[-1])[pack]  # [N, H]
        x = self.inputs(tokens, feats)  # [B, T, H] or [N, H]
        cos, sin = self.cos[positions].unsqueeze(-2), self.sin_signed[positions].unsqueeze(-2)  # [.., 1, D]
        attend = Attention(self.attention, prefix, tail, T, kv_len, s.heads, s.kv_heads)
        row_idx = torch.arange(rows.start, rows.stop, device=tokens.device)[:, None].expand(B, T)
        write_rows, write_cols = row_idx, write_pos
        if pack is not None:  # only real tokens are written
            write_rows, write_cols = row_idx.reshape(-1)[pack], write_pos.reshape(-1)[pack]
        q_sz = s.heads * s.head_dim
        residual = None
        for li, w in enumerate(self.layers):
            x, h = self.ops.add_norm(x, residual, w["ln1"], s.eps)
            qkv = F.linear(h, w["qkv"], w["qkv_b"])  # [B, T, (Hq + 2 Hkv) D] or [N, ...]
            q, k, v = self.ops.rope(qkv, cos, sin, w["q_norm"], w["k_norm"], s.heads, s.kv_heads, s.head_dim,
                                    s.eps)  # [.., H, D] each
            # into the cache in place (not inside a compiled function: torch.compile would copy the whole cache)
            cache.write(li, write_rows, write_cols, k, v)
            if not want_logits and li == s.layers - 1 and not cache.has_features:
                return None  # prefill needs only the cache: the last layer's attention and MLP are unused
            if pack is not None:  # back to [B, T] for attention, zeros in the padding
                q = q.new_zeros(B * T, *q.shape[1:]).index_copy_(0, pack, q).view(B, T, *q.shape[1:])
            # the Triton kernel reads a paged pool through its table in place; SDPA reads the rows' K/V (a view of
            # dense rows, or the pages gathered)
            paged = cache.pages(li, rows) if self.attention == "triton" else None
            a = attend(q.transpose(1, 2), *(paged or cache.layer(li, rows, kv_len)))  # [B, Hq, T, D]
            a = a.transpose(1, 2).reshape(B, T, q_sz)  # a view when the kernel wrote tokens-major
            if pack is not None:
                a = a.view(B * T, q_sz).index_select(0, pack)  # [N, q_sz]
            residual = F.linear(a, w["o"], w["o_b"])
            x, h = self.ops.add_norm(x, residual, w["ln2"], s.eps)
            residual = F.linear(self.ops.silu_mul(F.linear(h, w["gate_up"], w["gate_up_b"])), w["down"], w["down_b"])
        if cache.has_features:  # every new token's feature (the next draft-head steps read them)
            _, h = self.final(x, residual)
            cache.write_features(write_rows, write_cols, h)
            if not want_logits:
                return None
            if logits_at is not None:
                h = h.gather(1, logits_at[..., None].expand(-1, -1, s.hidden))  # [B, K, H]
        else:
            if logits_at is not None:
                x = x.gather(1, logits_at[..., None].expand(-1, -1, s.hidden))  # [B, K, H]
                residual = residual.gather(1, logits_at[..., None].expand(-1, -1, s.hidden))
            _, h = self.final(x, residual)
        logits = F.linear(h, self.lm_head)  # [B, K, V]
        return (logits, h) if return_hidden else logits

    def inputs(self, tokens: torch.Tensor, feats: torch.Tensor | None) -> torch.Tensor:
        """The first layer's input: the token embeddings (a draft head adds the actor's features)."""
        return self.embed[tokens]

    def final(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream, final hidden state): the last norm's input and output (post-norm = the feature)."""
        return self.ops.add_norm(x, residual, self.norm, self.shape.eps)


def layer_params(sd: Mapping[str, torch.Tensor], p: str, s: ModelShape, dev, dt) -> tuple[dict, dict]:
    """One decoder layer's fused weights (zeros, to be loaded) and a view per HF parameter name under prefix p."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    inter = sd[p + "mlp.gate_proj.weight"].shape[0]
    z = lambda *shape: torch.zeros(*shape, device=dev, dtype=dt)  # noqa: E731
    has = lambda n: p + n in sd  # noqa: E731
    w = {
        "ln1": z(s.hidden), "ln2": z(s.hidden),
        "qkv": z(q + 2 * kv, s.hidden), "o": z(s.hidden, q),
        "gate_up": z(2 * inter, s.hidden), "down": z(s.hidden, inter),
        "qkv_b": z(q + 2 * kv) if has("self_attn.q_proj.bias") else None,
        "o_b": z(s.hidden) if has("self_attn.o_proj.bias") else None,
        "gate_up_b": z(2 * inter) if has("mlp.gate_proj.bias") else None,
        "down_b": z(s.hidden) if has("mlp.down_proj.bias") else None,
        "q_norm": z(s.head_dim) if has("self_attn.q_norm.weight") else None,  # Qwen3: per-head RMSNorm
        "k_norm": z(s.head_dim) if has("self_attn.k_norm.weight") else None,
    }
    names = {
        "input_layernorm.weight": w["ln1"], "post_attention_layernorm.weight": w["ln2"],
        "self_attn.q_proj.weight": w["qkv"][:q], "self_attn.k_proj.weight": w["qkv"][q:q + kv],
        "self_attn.v_proj.weight": w["qkv"][q + kv:], "self_attn.o_proj.weight": w["o"],
        "mlp.gate_proj.weight": w["gate_up"][:inter], "mlp.up_proj.weight": w["gate_up"][inter:],
        "mlp.down_proj.weight": w["down"],
    }
    if w["qkv_b"] is not None:
        names.update({"self_attn.q_proj.bias": w["qkv_b"][:q], "self_attn.k_proj.bias": w["qkv_b"][q:q + kv],
                      "self_attn.v_proj.bias": w["qkv_b"][q + kv:]})
    if w["o_b"] is not None:
        names["self_attn.o_proj.bias"] = w["o_b"]
    if w["q_norm"] is not None:
        names.update({"self_attn.q_norm.weight": w["q_norm"], "self_attn.k_norm.weight": w["k_norm"]})
    if w["gate_up_b"] is not None:
        names.update({"mlp.gate_proj.bias": w["gate_up_b"][:inter], "mlp.up_proj.bias": w["gate_up_b"][inter:],
                      "mlp.down_proj.bias": w["down_b"]})
    return w, {p + n: t for n, t in names.items()}


class EagerOps:
    """The forward's elementwise pieces, as HF computes them (bit for bit in float32)."""

    @staticmethod
    def add_norm(x, residual, weight, eps):
        """(x + residual, rms_norm(x + residual)): the residual stream and the next block's input."""
        if residual is not None:
            x = x + residual
        return x, rms_norm(x, weight, eps)

    @staticmethod
    def rope(qkv, cos, sin_signed, q_norm, k_norm, heads: int, kv_heads: int, head_dim: int, eps: float):
        """q, k with RoPE (Qwen3 normalises each head first) and v, from the fused projection: [.., H, D] each."""
        qk_heads = heads + kv_heads
        qk = qkv[..., :qk_heads * head_dim].unflatten(-1, (qk_heads, head_dim))
        if q_norm is not None:
            qk = torch.cat([rms_norm(qk[..., :heads, :], q_norm, eps), rms_norm(qk[..., heads:, :], k_norm, eps)],
                           dim=-2)
        qk = apply_rope(qk, cos, sin_signed)
        return qk[..., :heads, :], qk[..., heads:, :], qkv[..., qk_heads * head_dim:].unflatten(-1, (kv_heads, head_dim))

    @staticmethod
    def silu_mul(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class CompiledOps:
    """The same pieces through torch.compile (CUDA): each becomes one fused kernel instead of five to ten. One
    instance per process (`compiled_ops`), so engines share what was compiled."""

    def __init__(self):
        import torch._dynamo

        cfg = torch._dynamo.config  # shapes vary by bucket, rank (packed or not) and residual-or-none
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        opts = {"dynamic": True, "fullgraph": True}
        self.add_norm = torch.compile(EagerOps.add_norm, **opts)
        self.rope = torch.compile(EagerOps.rope, **opts)
        self.silu_mul = torch.compile(EagerOps.silu_mul, **opts)


@functools.cache
def compiled_ops() -> CompiledOps:
    return CompiledOps()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Exactly HF's LlamaRMSNorm (variance in float32)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """HF's x * cos + rotate_half(x) * sin, bit for bit: rotate_half(x) * sin = roll(x) * [-sin1, sin2]."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed
