"""Records that cross the engine's boundary: requests, outputs, exported samples, stats."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Hashable

import torch


@dataclass
class SamplingParams:
    """Per-request decoding settings; temperature 0 means greedy (target argmax)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off, as in HF
    max_new_tokens: int = 64
    seed: int | None = None  # None: drawn from torch's global generator when the request is added
    logprobs: bool = False

    def validate(self, where: str = "sampling") -> None:
        if not self.temperature >= 0:
            raise ValueError(f"{where}.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"{where}.top_p must be in (0, 1], got {self.top_p}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"{where}.top_k must be an integer >= 0, got {self.top_k}")
        if int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1:
            raise ValueError(f"{where}.max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")


@dataclass
class GenRequest:
    request_id: Hashable
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # rollout drafts (`drafting.spec.suffix`): samples of one `group` (a GRPO prompt's n samples) draft from each
    # other's tokens; `history`: earlier rollouts' responses to the same prompt, handed in by the fleet (which
    # keeps them per prompt id across iterations). Evaluation requests carry neither.
    group: Hashable | None = None
    history: list[list[int]] | None = None


@dataclass
class GenOutput:
    """A finished sample.

    `logprobs` (when asked for) are log p(token) under the target's *processed* distribution p the token
    was drawn from (after temperature/top-k/top-p; raw softmax for greedy requests)."""

    request_id: Hashable
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS emitted, included) or "length" (max_new_tokens or max_len)
    stats: dict
    logprobs: list[float] | None = None
    features: torch.Tensor | None = None  # [len - 1, H] the target's features (engine.keep_features, a head's data)


@dataclass
class KVRange:
    """Committed K/V of one sample for positions [start, start + len): the unit two-stage migration copies."""

    start: int
    target_k: torch.Tensor  # [L, Hkv, len, D]
    target_v: torch.Tensor
    draft_k: torch.Tensor | None = None  # [Ld, Hkv_d, len_d, Dd]; may be shorter (draft lags by design)
    draft_v: torch.Tensor | None = None
    target_h: torch.Tensor | None = None  # [1, 1, len, H] the target's features, kept when the draft is a head


@dataclass
class SampleState:
    """Everything needed to continue a live sample on another engine exactly as it would have run here.

    KV tensors hold positions [kv_start, target_len) / [kv_start, draft_len); positions before kv_start
    travel separately as KVRange prefixes (stage 1 of a migration)."""

    request_id: Hashable
    prompt_token_ids: list[int]
    token_ids: list[int]  # response so far
    sampling: SamplingParams
    seed: int  # with the absolute token position, all the randomness a sample's future tokens need
    steps: int
    drafted: int
    accepted: int
    logprobs: list[float] | None
    target_len: int  # committed target K/V length (= len(prompt) + len(response) - 1)
    draft_len: int
    kv_start: int
    target_k: torch.Tensor  # [L, Hkv, target_len - kv_start, D]
    target_v: torch.Tensor
    draft_k: torch.Tensor | None
    draft_v: torch.Tensor | None
    target_h: torch.Tensor | None = None  # [1, 1, target_len - kv_start, H] with a draft head (drafting.head)
    group: Hashable | None = None  # its request group (rollout drafts)
    drafts: dict | None = None  # what it drafts from at the destination: its group's documents and history

    def _kv(self) -> tuple:
        return tuple(t for t in (self.target_k, self.target_v, self.draft_k, self.draft_v, self.target_h)
                     if t is not None)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._kv())

    def to_host(self) -> "SampleState":
        """The state with its K/V in host memory (a preempted sample's swap)."""
        return dataclasses.replace(self, **{f: None if t is None else t.cpu() for f, t in (
            ("target_k", self.target_k), ("target_v", self.target_v), ("draft_k", self.draft_k),
            ("draft_v", self.draft_v), ("target_h", self.target_h))})

    def without_kv(self) -> "SampleState":
        """The state alone: resuming recomputes its K/V."""
        return dataclasses.replace(self, target_k=None, target_v=None, draft_k=None, draft_v=None, target_h=None)


@dataclass
class EngineStats:
    live: int
    queued: int
    steps: int
    tokens: int  # tokens emitted since construction (or the last reset_stats)
    tokens_per_s: float  # emitted tokens / seconds spent inside step()
    mean_accepted: float  # accepted draft tokens per sample-step
    mean_tokens_per_step: float  # emitted tokens per sample-step (accepted + the bonus/correction token)
    step_ms: float  # mean wall time of one step()
    preemptions: int = 0  # samples preempted when the K/V pool ran dry
    resumed: int = 0
    prefill_tokens: int = 0  # prompt (and recomputed) tokens prefilled
    shared_tokens: int = 0  # prompt tokens a request group's sibling shared instead of prefilling
    tokens_held: int = 0  # committed tokens of the live samples
    kv_blocks: int = 0  # the paged cache's pool (0: dense)
    kv_blocks_used: int = 0
    kv_blocks_peak: int = 0
    kv_block: int = 0
