"""Draft sources: what proposes the tokens of a step's draft tree. The stages ask a source two things, and never
what kind it is:
- `catch_up`: take in the committed tokens it has not seen (row b: tokens[b, :width[b]] at positions start[b]..)
  and give the next token's logits after each row's last one, with its state there (what the root's children read);
- `expand`: one forward over the frontier nodes of a tree level (each with its tree-attention mask), giving their
  children's logits and the nodes' own state.
Each node of the tree records the source that proposed it (`TreeDrafter.source`).

A source's state travels with a migrated (or preempted) sample: `export` a row's positions, `load` them into a row.

Two sources: `ModelDraft`, a small draft model with its own K/V cache, and `HeadDraft`, an EAGLE-style head that
also reads the target's features (kept by the target's forwards in its cache) and its own predicted features one
level down. A source that proposes from token matches, with no forward pass, plugs in the same way."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # passed in: the models and their caches belong to the runtime
    from drafting.model.decoder import LeanDecoder
    from drafting.runtime.kv_cache import KVCache


class ModelDraft:
    """A small draft model over its own K/V cache: no state beside its K/V."""

    name, id, features = "model", 1, 0

    def __init__(self, decoder: LeanDecoder, cache: KVCache):
        self.decoder, self.cache = decoder, cache

    def catch_up(self, rows: slice, tokens: torch.Tensor, positions: torch.Tensor, write_pos: torch.Tensor,
                 start: torch.Tensor, tail: torch.Tensor, kv_len: int, at: torch.Tensor | None,
                 want_logits: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits at `at` [B, 1, V] or None, state there or None) after writing the tokens' K/V."""
        logits = self.decoder.forward(tokens, positions, self.cache, rows, write_pos=write_pos, prefix=start,
                                      tail=tail, kv_len=kv_len, logits_at=at, want_logits=want_logits)
        return logits, None

    def expand(self, B: int, tokens: torch.Tensor, positions: torch.Tensor, write_pos: torch.Tensor,
               prefix: torch.Tensor, tail: torch.Tensor, kv_len: int, parent_state: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Children's logits [B, w, V] of the frontier nodes `tokens` [B, w], and the nodes' state (None)."""
        return self.decoder.forward(tokens, positions, self.cache, slice(0, B), write_pos=write_pos, prefix=prefix,
                                    tail=tail, kv_len=kv_len), None

    def export(self, row: int, start: int, committed: int, seen: int) -> dict:
        """The row's state from position `start`, as `KVRange` fields: its K/V up to `seen` (the tokens it has
        caught up on; `committed`: the target's)."""
        k, v = self.cache.read(row, start, max(start, seen))
        return {"draft_k": k, "draft_v": v}

    def load(self, row: int, kr, covered: int, what: str) -> int:
        """A range's state into the row where it continues what is there (`covered` positions from 0); returns
        the positions covered now."""
        if kr.draft_k is None or kr.start > covered:
            return covered
        self.cache.load(row, kr.start, kr.draft_k, kr.draft_v)
        return max(covered, kr.start + kr.draft_k.shape[2])


class HeadDraft(ModelDraft):
    """An EAGLE-style head: each token reads the target's feature at the position before it (from the target
    cache's feature buffer); inside the tree a node reads the feature the head predicted for its parent."""

    name, id = "head", 2

    def __init__(self, decoder: LeanDecoder, cache: KVCache, target_cache: KVCache):
        super().__init__(decoder, cache)
        self.target_cache = target_cache
        self.features = decoder.shape.hidden

    def catch_up(self, rows, tokens, positions, write_pos, start, tail, kv_len, at, want_logits):
        prev = self.target_cache.features_at(rows, (positions - 1).clamp(min=0))
        prev = prev * (positions > 0)[..., None]  # [B, W, H]
        out = self.decoder.forward(tokens, positions, self.cache, rows, write_pos=write_pos, prefix=start, tail=tail,
                                   kv_len=kv_len, logits_at=at, want_logits=want_logits, feats=prev,
                                   return_hidden=want_logits)
        return (out[0], out[1][:, 0]) if want_logits else (None, None)  # the feature at the root: [B, H]

    def expand(self, B, tokens, positions, write_pos, prefix, tail, kv_len, parent_state):
        return self.decoder.forward(tokens, positions, self.cache, slice(0, B), write_pos=write_pos, prefix=prefix,
                                    tail=tail, kv_len=kv_len, feats=parent_state, return_hidden=True)

    def export(self, row, start, committed, seen):
        """Its K/V and the target's features it reads (up to the target's committed positions)."""
        return {**super().export(row, start, committed, seen),
                "target_h": self.target_cache.read_features(row, start, max(start, committed))}

    def load(self, row, kr, covered, what):
        if kr.target_h is None:
            raise ValueError(f"{what}: this engine's draft head needs the target's features, and the sample came "
                             f"without (from an engine with a draft model?)")
        self.target_cache.load_features(row, kr.start, kr.target_h)
        return super().load(row, kr, covered, what)
