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

import time

import numpy as np
import torch

from drafting.calibration import Calibration
from drafting.predictor import AcceptancePredictor
from drafting.strategy import DraftStrategy, StepView
from drafting.tree import DraftTree

CURVE = 24  # nodes per sample the plain-or-draft estimate looks at
PROBE_AFTER = 16  # plain steps in a row after which one drafting step refreshes what drafting would gain
PRIOR_ACCEPT = 0.8  # before anything is learnt: a sample's j-th best node is accepted with 0.8 ** (j + 1)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()


class AdaptiveStrategy(DraftStrategy):
    def __init__(self, calibration: Calibration, predictor: AcceptancePredictor | None = None, topk: int = 2,
                 widths: tuple[int, ...] = (1, 2, 4), max_depth: int = 8):
        super().__init__("adaptive", max_depth, topk, 0, max(widths))
        self.cal = calibration
        self.predictor = predictor or AcceptancePredictor()
        self.widths = tuple(sorted(widths))
        self.decision: dict = {}  # what the last step planned, for the engine's step log
        j = np.arange(CURVE)
        self._curve = PRIOR_ACCEPT ** (j + 1.0)  # EMA over steps: expected acceptance of a sample's j-th best node
        self._levels = j + 1.0  # EMA: levels drafted to reach a sample's best j + 1 nodes
        self._width_used = 1
        self._plain_run = 0
        # this step: live samples, context, predicted draft time so far, the verify-time quadratic, the tree's
        # path acceptance / own acceptance / depth / sibling rank as numpy (small arrays: numpy is cheaper)
        self._B = self._ctx = 0
        self._spent_ms = 0.0
        self._vq, self._vq_memo = np.zeros(6), {}
        self._policy_ms, self._score_s = 0.0, 0.0  # this policy's own time per drafted level (EMA), last scoring
        self._score = self._cond = np.zeros((0, 0))
        self._depth = self._rank = np.zeros(0, dtype=np.int64)

    @property
    def max_width(self) -> int:
        return max(self.widths)

    # -- plan ------------------------------------------------------------------------------------------------
    def plan(self, view: StepView) -> bool:
        """Draft if the best predicted drafting rate beats plain decoding. The draft's catch-up on tokens it
        missed during plain steps is left out of the comparison: it is paid whenever drafting resumes."""
        B, ctx = self._B, self._ctx = view.live, view.context
        self._score = self._cond = np.zeros((B, 0))  # a new tree
        self._spent_ms = self.cal.root_ms(B, max(view.draft_lag, 1), ctx)  # the draft's catch-up forward
        key = (B, ctx // 4)
        if key not in self._vq_memo:  # the same few (live, context) pairs recur step after step
            self._vq_memo = {} if len(self._vq_memo) > 4096 else self._vq_memo
            self._vq_memo[key] = self._verify_quadratic(B, ctx // 4 * 4 + 2)
        self._vq = self._vq_memo[key]
        plain_rate = B / self.cal.plain_ms(B, ctx)
        c = np.arange(1, CURVE + 1)
        ms = (self.cal.root_ms(B, 2, ctx) + np.maximum(self._levels - 1, 0) * self.cal.level_ms(B, self._width_used, ctx)
              + self._verify_ms(B * (1 + c), 1 + c))
        spec_rate = float(((B + B * np.cumsum(self._curve)) / ms).max())
        draft = spec_rate > plain_rate or self._plain_run >= PROBE_AFTER
        self._plain_run = 0 if draft else self._plain_run + 1
        self.decision = {"plain_rate": plain_rate, "spec_rate": spec_rate}
        return draft

    def _verify_quadratic(self, B: int, ctx: int) -> np.ndarray:
        """The verify model at this step's live samples and context, as a quadratic in (tokens, padded width):
        exact for the smooth families (both at most quadratic), and a few multiply-adds to evaluate."""
        n, t = np.meshgrid(np.array([1.0, 1 + CURVE / 2, 1 + CURVE]), np.array([1.0, 1 + CURVE / 2, 1 + CURVE]))
        n, t = n.ravel(), t.ravel()  # tokens per sample, width
        ms = self.cal.verify_ms(B, B * n, t, ctx)
        return np.linalg.lstsq(np.stack([np.ones_like(n), n, t, n * n, n * t, t * t], 1), ms, rcond=None)[0]

    def _verify_ms(self, tokens, width) -> np.ndarray:
        n, t = np.asarray(tokens, dtype=np.float64) / self._B, np.asarray(width, dtype=np.float64)
        c = self._vq
        return np.maximum(c[0] + c[1] * n + c[2] * t + c[3] * n * n + c[4] * n * t + c[5] * t * t, 1e-3)

    # -- scoring and depth -----------------------------------------------------------------------------------
    def score(self, tree: DraftTree, view: StepView) -> None:
        """Predicted acceptance of the nodes drafted since the last call; path acceptance = parent's x own."""
        t0 = time.perf_counter()
        done = self._score.shape[1]
        B, N = tree.tokens.shape
        M = N - done
        depth, rank = _np(tree.depth), _np(tree.rank)
        feats = np.empty((B, M, 6))
        for j, t in enumerate((tree.value, tree.q, tree.margin)):
            feats[..., j] = _np(t)[:, done:]
        feats[..., 3], feats[..., 4] = depth[done:], rank[done:]
        feats[..., 5] = _np(view.temperature)[:, None]
        cond = np.concatenate([self._cond, self.predictor.predict(feats.reshape(-1, 6)).reshape(B, M)], 1)
        score = np.concatenate([self._score, cond[:, done:]], 1)
        parents = _np(tree.parents)
        for d in range(int(depth[done]), int(depth[-1]) + 1):  # new levels, parents before children
            idx = done + np.nonzero(depth[done:] == d)[0]
            par = parents[:, idx]
            if d > 1:
                score[:, idx] *= np.take_along_axis(score, par, 1)
        self._score, self._cond, self._depth, self._rank = score, cond, depth, rank
        tree.score = torch.from_numpy(score).to(tree.value.device)
        tree.cond = torch.from_numpy(cond).to(tree.value.device)
        self._score_s = time.perf_counter() - t0

    def deeper(self, tree: DraftTree, view: StepView) -> bool:
        """Marginal analysis on top of the best selection so far: another level of width w pays if the nodes it
        would add that are worth their verify cost (more expected tokens than the rate x their cost) raise the
        rate after paying for the level, this policy's own time per level included."""
        if tree.levels >= self.max_depth:
            return False
        t0 = time.perf_counter()
        B, ctx, score = self._B, self._ctx, self._score
        best = self._best_prefix(score)
        n_tok, width = B + best["k"], best["width"]
        per_token = float(self._verify_ms(n_tok + B, width) - self._verify_ms(n_tok, width)) / B
        newest = self._depth == self._depth[-1]
        # how much of a frontier node's acceptance its best child keeps: the newest level's best children tell
        firsts = np.sort(self._cond[:, newest & (self._rank == 0)], axis=None)
        keep = float(firsts[int(0.9 * (firsts.size - 1))]) if firsts.size else 0.9
        p_new = -np.sort(-score[:, newest], axis=1)  # [B, M] best first
        bar = best["rate"] * per_token  # expected tokens a node must bring to pay for its verification
        best_w, best_rate = 0, best["rate"]
        for w in self.widths:
            if w > p_new.shape[1]:
                break
            hypo = p_new[:, :w] * keep  # one optimistic child per frontier node
            useful = hypo[hypo > bar]
            level = self.cal.level_ms(B, w, ctx) + self._policy_ms
            rate = (B + best["gain"] + useful.sum()) / (self._spent_ms + level + best["verify_ms"]
                                                        + useful.size * per_token)
            if rate > best_rate:
                best_w, best_rate = w, rate
        if best_w:
            self.width = best_w
            self._spent_ms += self.cal.level_ms(B, best_w, ctx) + self._policy_ms
        # this policy's own time per level (scoring + deciding), an EMA: a level costs it too
        self._policy_ms = 0.9 * self._policy_ms + 0.1 * 1000 * (time.perf_counter() - t0 + self._score_s)
        return best_w > 0

    # -- selection -------------------------------------------------------------------------------------------
    def select(self, tree: DraftTree, view: StepView) -> torch.Tensor:
        B, N = self._score.shape
        best = self._best_prefix(self._score)
        chosen = np.zeros(B * N, dtype=bool)
        chosen[best["order"][:best["k"]]] = True
        self.decision.update({"rate": best["rate"], "nodes": best["k"], "predicted_accepted": best["gain"],
                              "predicted_ms": self._spent_ms + best["verify_ms"], "levels": tree.levels})
        self._learn_curve()
        return torch.from_numpy(chosen.reshape(B, N)).to(tree.value.device)

    def _best_prefix(self, score: np.ndarray) -> dict:
        """The best prefix of all samples' nodes ranked by predicted acceptance: its rate (tokens/ms), size k,
        expected accepted tokens, verify time and padded width (1 + the most nodes one sample gets), and the
        ranking."""
        B, N = score.shape
        order = np.argsort(-score.ravel(), kind="stable")
        K = min(order.size, B * CURVE)
        by_row = np.argsort(-score, axis=1, kind="stable")
        rank = np.empty_like(by_row)
        np.put_along_axis(rank, by_row, np.broadcast_to(np.arange(1, N + 1), (B, N)), axis=1)  # rank in sample
        width = np.ones(K + 1)
        width[1:] += np.maximum.accumulate(rank.ravel()[order[:K]])
        gain = np.zeros(K + 1)
        np.cumsum(score.ravel()[order[:K]], out=gain[1:])
        verify = self._verify_ms(B + np.arange(K + 1), width)
        rate = (B + gain) / (self._spent_ms + verify)
        k = int(rate.argmax())
        return {"rate": float(rate[k]), "k": k, "gain": float(gain[k]), "verify_ms": float(verify[k]),
                "width": float(width[k]), "order": order}

    def _learn_curve(self) -> None:
        """Per-sample acceptance by node rank and the levels it takes, averaged over samples (EMA over steps):
        what the next step's plain-or-draft estimate assumes. Ranks a shallow tree did not reach keep what
        was learnt before."""
        idx = np.argsort(-self._score, axis=1, kind="stable")
        n = min(CURVE, self._score.shape[1])
        a = 0.2
        self._curve[:n] = (1 - a) * self._curve[:n] + a * np.take_along_axis(self._score, idx[:, :n], 1).mean(0)
        levels = np.maximum.accumulate(self._depth[idx[:, :n]], axis=1).mean(0)
        self._levels[:n] = (1 - a) * self._levels[:n] + a * levels
        self._width_used = self.width

    # -- learning --------------------------------------------------------------------------------------------
    def observe(self, record: dict) -> None:
        predicted = record.get("predicted")
        self.predictor.observe(record["features"].cpu().numpy(), record["accepted"].cpu().numpy(),
                               None if predicted is None else predicted.cpu().numpy())

    def reset(self) -> None:
        """The draft changed: forget its acceptance records; the predictor refits on new ones."""
        self.predictor.reset()
