"""The experience batch passed between RLHF phases, its token layout, and the forwards that fill it.

Layout of a batch (T = P + R):  [ left-padded prompt (P) | right-padded response (R) ].
Position ids come from the attention mask, so a left-padded row computes exactly what it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Iterator

import torch

from trainer.core.algorithms import entropy_from_logits

TOKEN_FIELDS = ("old_logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns")


@dataclass
class Experience:
    """One rollout batch; per-token tensors are [B, R] and aligned with action_mask."""

    sequences: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T]
    action_mask: torch.Tensor  # [B, R]
    num_actions: int  # R
    old_logprobs: torch.Tensor | None = None  # [B, R]
    ref_logprobs: torch.Tensor | None = None  # [B, R]
    values: torch.Tensor | None = None  # [B, R]
    rewards: torch.Tensor | None = None  # [B, R] token-level
    advantages: torch.Tensor | None = None  # [B, R]
    returns: torch.Tensor | None = None  # [B, R]
    scores: torch.Tensor | None = None  # [B]
    # the old policy's top-k per response position, the draft trainer's teacher (draft.loss=kl_topk)
    topk_logprobs: torch.Tensor | None = None  # [B, R, k] float
    topk_ids: torch.Tensor | None = None  # [B, R, k] long
    # the old policy's features (final hidden state after the last norm) at every position, a draft head's input
    # and teacher (draft.online with a head, `drafting.head`); the model's dtype
    features: torch.Tensor | None = None  # [B, T, H]
    info: dict = field(default_factory=dict)  # per-sample stats: tensors [B] or lists of length B

    def __post_init__(self) -> None:
        b, t = self.sequences.shape
        if self.attention_mask.shape != (b, t):
            shape = tuple(self.attention_mask.shape)
            raise ValueError(f"Experience.attention_mask has shape {shape}, expected {(b, t)}")
        if self.action_mask.shape != (b, self.num_actions):
            raise ValueError(
                f"Experience.action_mask has shape {tuple(self.action_mask.shape)}, expected {(b, self.num_actions)}"
            )
        for name in TOKEN_FIELDS:
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (b, self.num_actions):
                raise ValueError(f"Experience.{name} has shape {tuple(value.shape)}, expected {(b, self.num_actions)}")
        for name in ("topk_logprobs", "topk_ids"):
            value = getattr(self, name)
            if value is not None and (value.dim() != 3 or tuple(value.shape[:2]) != (b, self.num_actions)):
                raise ValueError(f"Experience.{name} has shape {tuple(value.shape)}, "
                                 f"expected {(b, self.num_actions)} + (k,)")
        if self.features is not None and (self.features.dim() != 3 or tuple(self.features.shape[:2]) != (b, t)):
            raise ValueError(f"Experience.features has shape {tuple(self.features.shape)}, expected {(b, t)} + (H,)")

    @property
    def batch_size(self) -> int:
        return self.sequences.shape[0]

    def select(self, index: torch.Tensor | slice) -> "Experience":
        """Rows `index` of every batched field (tensors, scores, per-sample info)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "num_actions":
                out[f.name] = value
            elif f.name == "info":
                out[f.name] = {k: _select_rows(v, index, self.batch_size) for k, v in value.items()}
            else:
                out[f.name] = None if value is None else value[index]
        return Experience(**out)

    def split(self, n: int) -> list["Experience"]:
        """n equal contiguous shards, one per data-parallel rank (equal sizes keep the ranks in lock-step)."""
        if n < 1 or self.batch_size % n != 0:
            raise ValueError(f"Experience of batch size {self.batch_size} does not split evenly across {n} ranks")
        size = self.batch_size // n
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(n)]

    def minibatches(self, size: int, shuffle_seed: int | None = None,
                    group_by_length: bool = False) -> Iterator["Experience"]:
        """Minibatches of `size` rows (the last may be smaller), in a seeded random order or in order.

        group_by_length puts rows of similar length together (in a random order of minibatches): with
        long-tailed responses most of a random minibatch would be padding.
        """
        if size < 1:
            raise ValueError(f"minibatch size must be >= 1, got {size}")
        if shuffle_seed is None:
            order = torch.arange(self.batch_size)
            generator = None
        else:
            generator = torch.Generator().manual_seed(shuffle_seed)
            order = torch.randperm(self.batch_size, generator=generator)
        chunks = [order[start : start + size] for start in range(0, self.batch_size, size)]
        if group_by_length:
            lengths = self.attention_mask.sum(1)[order]
            order = order[torch.sort(lengths, stable=True).indices]
            chunks = [order[start : start + size] for start in range(0, self.batch_size, size)]
            if generator is not None:
                chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=generator).tolist()]
        for chunk in chunks:
            yield self.select(chunk)

    def to(self, device: torch.device | str) -> "Experience":
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        info = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.info.items()}
        return replace(self, **moved, info=info)


def _select_rows(value, index, batch_size: int):
    """Per-sample info is sliced with the batch; anything not of batch length is kept whole."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
        return value[index]
    if isinstance(value, (list, tuple)) and len(value) == batch_size:
        if isinstance(index, slice):
            return list(value[index])
        return [value[i] for i in index.tolist()]
    return value


def make_sequences(
    prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack prompts (left-padded to P) and responses (right-padded to R) into [B, P+R] rows.

    Returns (sequences [B, T] long, attention_mask [B, T] long, action_mask [B, R] long).
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"make_sequences: {len(prompt_ids)} prompts but {len(response_ids)} responses")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("make_sequences: every prompt needs at least one token")
    b = len(prompt_ids)
    p_len = max(len(p) for p in prompt_ids)
    r_len = max((len(r) for r in response_ids), default=0)
    sequences = torch.full((b, p_len + r_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, p_len + r_len), dtype=torch.long)
    action_mask = torch.zeros((b, r_len), dtype=torch.long)
    for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        sequences[i, p_len - len(prompt) : p_len] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, p_len - len(prompt) : p_len] = 1
        if response:
            sequences[i, p_len : p_len + len(response)] = torch.tensor(response, dtype=torch.long)
            attention_mask[i, p_len : p_len + len(response)] = 1
            action_mask[i, : len(response)] = 1
    return sequences, attention_mask, action_mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: cumsum(mask) - 1, clamped at 0. [B, T]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def trim_padding(sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int):
    """Drop columns that are padding in every row (leading prompt pad, trailing response pad).

    Long-tailed batches are mostly padding; the trimmed batch gives the same per-token results.
    Returns (sequences, attention_mask, kept_actions) with kept_actions <= num_actions.
    """
    prompt_width = sequences.shape[1] - num_actions
    used = attention_mask.bool().any(0)  # [T]
    first = int(used.nonzero()[0]) if used.any() else 0
    response_used = used[prompt_width:].nonzero()
    kept = max(1, int(response_used[-1]) + 1) if len(response_used) else min(1, num_actions)
    end = prompt_width + kept
    return sequences[:, first:end], attention_mask[:, first:end], kept


def _pad_actions(x: torch.Tensor, num_actions: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, num_actions - x.shape[1]))


def response_logits(
    model: torch.nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits / temperature [B, R', V] at the positions that predict the response tokens, and those tokens
    [B, R'] (R' <= R: columns that are padding in every row are skipped). Logits at [P-1, T-1) predict [P, T)."""
    sequences, attention_mask, num_actions = trim_padding(sequences, attention_mask, num_actions)
    out = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=num_actions + 1,  # only positions [P-1, T) are needed
    )
    logits = out.logits[:, :-1].float()  # [B, R', V]
    if temperature != 1.0:
        logits = logits / temperature
    return logits, sequences[:, -num_actions:]


def sequence_logprobs(
    model: torch.nn.Module,
    sequences: torch.Tensor,  # [B, T]
    attention_mask: torch.Tensor,  # [B, T]
    num_actions: int,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [B, R] of the response tokens under logits / temperature (the rollout's temperature).

    With return_entropy also the entropy [B, R]. Columns that are padding in every row come out 0.
    """
    logits, targets = response_logits(model, sequences, attention_mask, num_actions, temperature)
    logprobs = _pad_actions(torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1), num_actions)
    if return_entropy:
        return logprobs, _pad_actions(entropy_from_logits(logits), num_actions)
    return logprobs


def sequence_logprobs_topk(
    model: torch.nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int,
    temperature: float, k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The old-logprob pass plus the draft's teacher from the same logits: log-probs [B, R] of the response
    tokens, and the top-k log-probs [B, R, k] with their token ids [B, R, k] at every response position."""
    logits, targets = response_logits(model, sequences, attention_mask, num_actions, temperature)
    logp_all = torch.log_softmax(logits, dim=-1)  # [B, R', V]
    logprobs = _pad_actions(logp_all.gather(-1, targets[..., None]).squeeze(-1), num_actions)
    top_logp, top_ids = logp_all.topk(min(k, logp_all.shape[-1]), dim=-1)  # [B, R', k] each
    pad = (0, 0, 0, num_actions - top_logp.shape[1])
    return logprobs, torch.nn.functional.pad(top_logp, pad), torch.nn.functional.pad(top_ids, pad)


def sequence_logprobs_features(
    model: torch.nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The old-logprob pass plus a draft head's data from the same forward: log-probs [B, R] of the response
    tokens, and the features [B, T, H] at every position (zeros at padding), in the model's dtype.

    The feature is the final norm's output, what the LM head reads: the same tensor the engine keeps for a head
    (`LeanDecoder.final`, `KVCache.feat`) and `drafting.head.actor_features` computes. It is read with a hook on
    that norm, so the call still goes through the model's (a DeepSpeed engine's) own forward."""
    norm = getattr(model, "module", model).base_model.norm
    captured = []
    handle = norm.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        logprobs = sequence_logprobs(model, sequences, attention_mask, num_actions, temperature)
    finally:
        handle.remove()
    h = captured[0]  # [B, W, H]: the columns trim_padding kept, from the first one used by any row
    used = attention_mask.bool().any(0)
    first = int(used.nonzero()[0]) if used.any() else 0
    feats = h.new_zeros(*sequences.shape, h.shape[-1])
    feats[:, first:first + h.shape[1]] = h
    return logprobs, feats * attention_mask[..., None].to(feats.dtype)


def hidden_states(model: torch.nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, T, H] of a *ForSequenceClassification model's backbone (left-padding safe)."""
    backbone = getattr(model, model.base_model_prefix)
    out = backbone(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


def sequence_values(
    model: torch.nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int
) -> torch.Tensor:
    """Per-token values [B, R]: the scalar head on the states [P-1, T-1) that predict each response token.

    `model` may be a DeepSpeed engine: the call goes through its forward (ZeRO-3 gathers weights in hooks
    around the top-level forward), and the head's per-token output is read with a forward hook.
    """
    full_actions = num_actions
    sequences, attention_mask, num_actions = trim_padding(sequences, attention_mask, num_actions)
    head = getattr(model, "module", model).score
    captured = []
    handle = head.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        model(
            input_ids=sequences,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
    finally:
        handle.remove()
    values = captured[0][:, -num_actions - 1 : -1].squeeze(-1).float()  # [B, T, 1] -> [B, R]
    return _pad_actions(values, full_actions)


def sequence_scores(model: torch.nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward-model score [B] read at each row's last non-pad token."""
    hidden = hidden_states(model, sequences, attention_mask)  # [B, T, H]
    width = attention_mask.shape[1]
    positions = torch.arange(width, device=attention_mask.device).expand_as(attention_mask)
    last = torch.where(attention_mask.bool(), positions, torch.zeros_like(positions)).max(dim=-1).values  # [B]
    last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]
    return model.score(last_hidden).squeeze(-1).float()
