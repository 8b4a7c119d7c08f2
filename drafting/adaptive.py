"""Workload-aware adaptive drafting (RLHFSpec's first mechanism): one decision per step for the whole batch.

Every choice maximises predicted committed tokens per second,
    (sum over samples of expected accepted tokens + one bonus token per sample) / (draft time + verify time),
with times from the profiled step-time model (`drafting.calibration`) and acceptance from the online
acceptance predictor (`drafting.predictor`):
- plan: draft at all, or take a plain step that skips the draft model;
- deeper: after each drafted level, draft another (and how wide) only if the best rate reachable with it beats
  the best rate without it;
- select: rank the drafted nodes of all live samples together by predicted path acceptance and verify the
  prefix with the best rate. A sample may get many nodes, few or none.
Many live samples make verification expensive: few nodes win. A long tail of few samples: many nodes win."""
from __future__ import annotations

import numpy as np
import torch

from drafting.calibration import Calibration
from drafting.predictor import AcceptancePredictor
from drafting.strategy import DraftStrategy, StepView
from drafting.tree import DraftTree

CURVE = 24  # nodes per sample the plain-or-draft estimate looks at
PROBE_AFTER = 16  # plain steps in a row after which one drafting step refreshes what drafting would gain
PRIOR_ACCEPT = 0.8  # before anything is learnt: a sample's j-th best node is accepted with 0.8 ** (j + 1)


class AdaptiveStrategy(DraftStrategy):
    def __init__(self, calibration: Calibration, predictor: AcceptancePredictor | None = None, topk: int = 2,
                 widths: tuple[int, ...] = (1, 2, 4), max_depth: int = 8):
        super().__init__("adaptive", max_depth, topk, 0, max(widths))
        self.cal = calibration
        self.predictor = predictor or AcceptancePredictor()
        self.widths = tuple(sorted(widths))
        self.decision: dict = {}  # what the last step planned, for the engine's step log
        self._spent_ms = 0.0  # predicted draft time of the current step so far
        j = np.arange(CURVE)
        self._curve = PRIOR_ACCEPT ** (j + 1.0)  # EMA over steps: expected acceptance of a sample's j-th best node
        self._levels = j + 1.0  # EMA: levels drafted to reach a sample's best j + 1 nodes
        self._width_used = 1
        self._plain_run = 0

    @property
    def max_width(self) -> int:
        return max(self.widths)

    # -- plan ------------------------------------------------------------------------------------------------
    def plan(self, view: StepView) -> bool:
        """Draft if the best predicted drafting rate beats plain decoding. The draft's catch-up on tokens it
        missed during plain steps is left out of the comparison: it is paid whenever drafting resumes."""
        B, ctx = view.live, view.context
        self._spent_ms = self.cal.root_ms(B, view.draft_lag + 1, ctx)
        plain_rate = B / self.cal.plain_ms(B, ctx)
        c = np.arange(1, CURVE + 1)
        ms = (self.cal.root_ms(B, 2, ctx) + np.maximum(self._levels - 1, 0) * self.cal.level_ms(B, self._width_used, ctx)
              + self.cal.verify_ms(B, B * (1 + c), 1 + c, ctx))
        spec_rate = float(((B + B * np.cumsum(self._curve)) / ms).max())
        draft = spec_rate > plain_rate or self._plain_run >= PROBE_AFTER
        self._plain_run = 0 if draft else self._plain_run + 1
        self.decision = {"plain_rate": plain_rate, "spec_rate": spec_rate}
        return draft

    # -- scoring and depth -----------------------------------------------------------------------------------
    def score(self, tree: DraftTree, view: StepView) -> None:
        """Predicted acceptance of the newest level's nodes; path acceptance = parent's x own."""
        done = 0 if tree.cond is None else tree.cond.shape[1]
        B, N = tree.tokens.shape
        new = slice(done, N)
        feats = torch.stack([tree.value[:, new], tree.q[:, new], tree.margin[:, new],
                             tree.depth[new].float().expand(B, -1), tree.rank[new].float().expand(B, -1),
                             view.temperature[:, None].float().expand(B, N - done)], dim=-1)
        cond = self.predictor.predict(feats.reshape(-1, feats.shape[-1])).view(B, N - done)
        par = tree.parents[:, new]
        parent_p = torch.where(par < 0, torch.ones_like(cond),
                               tree.score.gather(1, par.clamp(min=0)) if done else torch.ones_like(cond))
        tree.score = torch.cat([tree.score[:, :done], parent_p * cond], dim=1)
        tree.cond = cond if not done else torch.cat([tree.cond, cond], dim=1)

    def deeper(self, tree: DraftTree, view: StepView) -> bool:
        if tree.levels >= self.max_depth:
            return False
        B, ctx = view.live, view.context
        now, _ = self._best_prefix(tree.score, B, ctx, self._spent_ms)
        newest = (tree.depth == tree.levels).nonzero().squeeze(1)
        p_new = tree.score[:, newest]  # [B, M]
        first = tree.rank[newest] == 0
        cond_new = tree.cond[:, newest][:, first]
        # how much of a frontier node's acceptance its best child keeps: the newest level's best children tell
        keep = float(cond_new.flatten().quantile(0.9)) if cond_new.numel() else 0.9
        best_w, best_rate = 0, now
        for w in self.widths:
            if w > newest.numel():
                break
            hypo = p_new.topk(w, dim=1).values * keep  # one optimistic child per frontier node
            level = self.cal.level_ms(B, w, ctx)
            rate, _ = self._best_prefix(torch.cat([tree.score, hypo], dim=1), B, ctx, self._spent_ms + level)
            if rate > best_rate:
                best_w, best_rate = w, rate
        if best_w:
            self.width = best_w
            self._spent_ms += self.cal.level_ms(B, best_w, ctx)
        return best_w > 0

    # -- selection -------------------------------------------------------------------------------------------
    def select(self, tree: DraftTree, view: StepView) -> torch.Tensor:
        B, N = tree.score.shape
        rate, k = self._best_prefix(tree.score, B, view.context, self._spent_ms)
        flat = tree.score.flatten()
        order = flat.sort(descending=True, stable=True).indices[:k]
        chosen = torch.zeros(B * N, dtype=torch.bool, device=flat.device)
        chosen[order] = True
        chosen = chosen.view(B, N)
        self.decision.update({"rate": rate, "nodes": k, "predicted_accepted": float(flat[order].sum()),
                              "predicted_ms": float(B + flat[order].sum()) / rate if rate > 0 else float("nan"),
                              "levels": tree.levels})
        self._learn_curve(tree, B)
        return chosen

    def _best_prefix(self, score: torch.Tensor, B: int, ctx: int, spent_ms: float) -> tuple[float, int]:
        """(best rate in tokens/ms, nodes) over prefixes of all samples' nodes ranked by predicted acceptance.
        Verify cost depends on the packed tokens and on the padded width (1 + the most nodes one sample gets)."""
        N = score.shape[1]
        idx = score.sort(dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(idx).scatter_(1, idx, torch.arange(1, N + 1).expand(B, N))  # rank within sample
        vals, order = score.flatten().sort(descending=True, stable=True)
        K = min(vals.numel(), B * CURVE)
        width = np.ones(K + 1)
        width[1:] += np.maximum.accumulate(rank.flatten()[order[:K]].numpy())
        gain = np.zeros(K + 1)
        gain[1:] = vals[:K].double().cumsum(0).numpy()
        rate = (B + gain) / (spent_ms + self.cal.verify_ms(B, B + np.arange(K + 1), width, ctx))
        k = int(rate.argmax())
        return float(rate[k]), k

    def _learn_curve(self, tree: DraftTree, B: int) -> None:
        """Per-sample acceptance by node rank and the levels it takes, averaged over samples (EMA over steps):
        what the next step's plain-or-draft estimate assumes. Ranks a shallow tree did not reach keep what
        was learnt before."""
        s, idx = tree.score.sort(dim=1, descending=True)
        n = min(CURVE, s.shape[1])
        a = 0.2
        self._curve[:n] = (1 - a) * self._curve[:n] + a * s[:, :n].mean(0).numpy()
        levels = tree.depth[idx[:, :n]].cummax(dim=1).values.float().mean(0).numpy()
        self._levels[:n] = (1 - a) * self._levels[:n] + a * levels
        self._width_used = self.width

    # -- learning --------------------------------------------------------------------------------------------
    def observe(self, record: dict) -> None:
        self.predictor.observe(record["features"], record["accepted"], record.get("predicted"))

    def reset(self) -> None:
        """The draft changed: forget its acceptance records; the predictor refits on new ones."""
        self.predictor.reset()
