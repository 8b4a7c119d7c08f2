"""The engine's rollout drafts: each step, every live sample's chain from the rollout itself (its prompt, its
group's siblings, earlier epochs: `drafting.spec.suffix`) into the tree's chain nodes, scored by the per-source
`ChainPredictor`; after the step, the committed tokens into the index and the chains' outcomes into the predictor.

Host work only: one lookup per live sample before the step, one index update per committed token after it, and one
small copy of [B, depth] tokens and scores to the device (asynchronous on CUDA)."""
from __future__ import annotations

import time
from typing import Hashable

import numpy as np
import torch

from drafting.policy.chain_predictor import ChainPredictor
from drafting.policy.strategy import StepView
from drafting.records import GenRequest, SampleState
from drafting.spec.stages import Stages
from drafting.spec.suffix import SOURCES, RolloutDrafter, SuffixConfig


# with `gate` (the adaptive policy, which verifies a chain only where it pays): while the chains' accepted tokens
# per sample-step stay below GATE_MIN (an EMA over the steps that looked them up), most steps skip the lookups,
# which then cost more than the chains bring; every GATE_PROBE-th step still looks, so a change is seen
GATE_MIN, GATE_PROBE, GATE_EMA = 0.02, 16, 0.3


class RolloutDrafts:
    """One per engine: the suffix index of its samples and groups, and the chains it stages for each step."""

    def __init__(self, cfg: SuffixConfig, stages: Stages):
        cfg.validate()
        self.cfg, self.stages, self.depth = cfg, stages, cfg.max_depth
        self.index = RolloutDrafter(cfg)
        self.predictor = ChainPredictor(len(SOURCES), self.depth)
        S = stages.slots
        pinned = stages.device.type == "cuda"
        self.h_tok = torch.zeros(S, self.depth, dtype=torch.long, pin_memory=pinned)
        self.h_score = torch.zeros(S, self.depth, dtype=torch.float32, pin_memory=pinned)
        self.h_len = torch.zeros(S, dtype=torch.long, pin_memory=pinned)
        self._drafts: list = []  # this step's chains, by row
        self.gate = False  # skip lookups while the chains do not pay (set with the adaptive strategy)
        self._yield, self._skipped, self._looked = 0.1, 0, False  # chain tokens per sample-step (EMA), skips
        self.reset_counts()

    def reset_counts(self) -> None:
        """Zero the counts `summary` reports (with the engine's stats); the index and the predictor stay."""
        self.counts = {"steps": 0, "sample_steps": 0, "looked_up": 0, "chains": 0, "verified": 0, "matched": 0,
                       "accepted": 0,
                       **{f"accepted_{s}": 0 for s in SOURCES}, **{f"chains_{s}": 0 for s in SOURCES}}
        self.lookup_s = 0.0

    # ---- samples in and out --------------------------------------------------------------------------------
    def add(self, request: GenRequest) -> None:
        self.index.add(request.request_id, request.group, list(request.prompt_token_ids), request.history)

    def finish(self, request_id: Hashable) -> None:
        self.index.finish(request_id)

    def export(self, request_id: Hashable) -> dict:
        return self.index.export(request_id)

    def load(self, state: SampleState) -> None:
        """A migrated sample drafts from its group here too: the documents it brought with it."""
        self.index.load(state.request_id, state.group, list(state.prompt_token_ids), list(state.token_ids),
                        state.drafts or {})

    # ---- the step ------------------------------------------------------------------------------------------
    def stage(self, live: list[GenRequest], view: StepView) -> None:
        """Look up every live sample's chain, write them (tokens, predicted path acceptance, length) into the stage
        buffers, and tell the policy through `view` (`chains`, `chain_score`)."""
        t0 = time.perf_counter()
        B, D = len(live), self.depth
        self._looked = not (self.gate and self._yield < GATE_MIN and self._skipped < GATE_PROBE)
        self._skipped = 0 if self._looked else self._skipped + 1
        if not self._looked:  # (nothing to stage: the stages leave the chain's nodes out)
            self._drafts = [None] * B
            view.chains, view.chain_score, view.chain_max = 0, np.zeros((B, D)), 0
            view.chain_tokens = np.full((B, D), -1)
            self.lookup_s += time.perf_counter() - t0
            return
        self._drafts = self.index.drafts([q.request_id for q in live])
        tok, score, length = self.h_tok[:B].numpy(), self.h_score[:B].numpy(), self.h_len[:B].numpy()
        tok.fill(0), score.fill(0.0), length.fill(0)
        found = [(b, d) for b, d in enumerate(self._drafts) if d is not None]
        chains = len(found)
        if found:  # one vectorised predictor read for the step's chains
            rows = np.array([b for b, _ in found])
            for b, d in found:
                L = min(len(d.tokens), D)
                tok[b, :L] = d.tokens[:L]
                length[b] = L
            rates = self.predictor.path_rates(*(np.array(v) for v in zip(*((d.source, d.match, d.count)
                                                                             for _, d in found))))
            score[rows] = np.where(np.arange(D)[None, :] < length[rows, None], rates, 0.0)
        st = self.stages
        st.chain_tok[:B].copy_(self.h_tok[:B], non_blocking=True)
        st.chain_score[:B].copy_(self.h_score[:B], non_blocking=True)
        st.chain_len[:B].copy_(self.h_len[:B], non_blocking=True)
        view.chains, view.chain_score, view.chain_max = chains, score.copy(), int(length.max()) if B else 0
        view.chain_tokens = np.where(np.arange(D)[None, :] < length[:, None], tok, -1)
        self.lookup_s += time.perf_counter() - t0

    def commit(self, live: list[GenRequest], out: np.ndarray, W: int, emitted: np.ndarray) -> None:
        """After the step (before finished rows leave): each row's committed tokens into the index, and each verified
        chain's outcome (the stage's extra columns: verified, matched, accepted; zeros after a plain step) into the
        predictor and the counts."""
        t0 = time.perf_counter()
        before = self.counts["accepted"]
        self.counts["steps"] += 1
        self.counts["sample_steps"] += len(live)
        self.counts["looked_up"] += len(live) if self._looked else 0
        toks, outcome = out[:len(live), :W].tolist(), out[:len(live), W + 4:W + 8].tolist()
        seen = []  # (source, match, count, verified, matched, first) of the verified chains: one predictor update
        for b, (q, n) in enumerate(zip(live, emitted.tolist())):
            self.index.commit(q.request_id, toks[b][:n])
            d = self._drafts[b] if b < len(self._drafts) else None
            if d is None:
                continue
            src = SOURCES[d.source]
            self.counts["chains"] += 1
            self.counts[f"chains_{src}"] += 1
            verified, matched, accepted, first = outcome[b]
            if verified:
                seen.append((d.source, d.match, d.count, verified, matched, first))
            self.counts["verified"] += verified
            self.counts["matched"] += min(matched, verified)
            self.counts["accepted"] += accepted
            self.counts[f"accepted_{src}"] += accepted
        if seen:
            self.predictor.observe_many(*(np.array(v) for v in zip(*seen)))
        self._drafts = []
        self.last_accepted = self.counts["accepted"] - before  # this step's chain tokens on the emitted paths
        if self._looked and live:
            self._yield = (1 - GATE_EMA) * self._yield + GATE_EMA * self.last_accepted / len(live)
        self.lookup_s += time.perf_counter() - t0

    def summary(self) -> dict:
        """Counts since construction: chain tokens accepted per sample-step by source, the index's size and hits,
        and the host time the lookups and updates took."""
        c, idx = self.counts, self.index.stats()
        ss = max(c["sample_steps"], 1)
        out = {"chain_tokens_per_step": c["accepted"] / ss, "chains_per_step": c["chains"] / ss,
               "chain_verified": c["verified"], "chain_matched": c["matched"], "chain_accepted": c["accepted"],
               "lookup_ms_per_step": 1000.0 * self.lookup_s / max(c["steps"], 1), "sample_steps": c["sample_steps"]}
        for s in SOURCES:
            out[f"chain_tokens_per_step_{s}"] = c[f"accepted_{s}"] / ss
            out[f"chains_{s}"] = c[f"chains_{s}"]
        out["history_hit_rate"] = c["chains_history"] / max(c["looked_up"], 1)  # of the samples looked up
        out.update({f"index_{k}": v for k, v in idx.items() if isinstance(v, (int, float))})
        return out
