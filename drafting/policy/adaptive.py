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
Many live samples make verification expensive: few nodes win. A long tail of few samples: many nodes win.

Two forms, two classes over the same models (`AdaptivePolicy`). `AdaptiveHost` decides as above, reading the tree's scores between levels (free on a CPU, where nothing is
asynchronous). `AdaptiveDevice` decides the whole step before it starts (`plan_shape`: plain, or levels x width x
nodes per sample) from what earlier steps measured: the mean predicted acceptance of each sample's j-th best
node in trees of each width and depth (`summarize`, computed on the device in the verify stage and brought
back with the step's one copy). Inside the step the predictor scores nodes on the device and each sample
verifies its best nodes: no host reads, so the step runs as CUDA graphs. Shapes not yet tried keep an
optimistic prior, so they get tried."""
from __future__ import annotations

import time

import numpy as np
import torch

from drafting.policy.calibration import Calibration
from drafting.policy.predictor import AcceptancePredictor, DevicePredictor
from drafting.policy.strategy import DraftStrategy, StepShape, StepView
from drafting.spec.tree import DraftTree, graft_chain

CURVE = 24  # nodes per sample the plain-or-draft estimate looks at
PROBE_AFTER = 16  # plain steps in a row after which one drafting step refreshes what drafting would gain
PRIOR_ACCEPT = 0.8  # before anything is learnt: a sample's j-th best node is accepted with 0.8 ** (j + 1)
CORRECTION_BUCKETS = 10  # live samples 1, 2-3, 4-7, ... , 512+
RECORD_EVERY = 4  # device mode: node records come back every this many drafting steps (the predictor's data)
# device mode: nodes per sample a step may verify. Each distinct step shape is a CUDA graph to capture (its first
# run is eager and slow), so the menu is short; between its sizes the rate curve is flat anyway
NODE_MENU = (1, 2, 3, 4, 6, 8, 12, 16, 24)


def bucket(live: int) -> int:
    return min(CORRECTION_BUCKETS - 1, max(live, 1).bit_length() - 1)


_QUAD_GRID = tuple(g.ravel() for g in np.meshgrid(np.array([1.0, 1 + CURVE / 2, 1 + CURVE]),
                                                   np.array([1.0, 1 + CURVE / 2, 1 + CURVE])))
_QUAD_PINV = np.linalg.pinv(np.stack([np.ones(9), _QUAD_GRID[0], _QUAD_GRID[1], _QUAD_GRID[0] ** 2,
                                      _QUAD_GRID[0] * _QUAD_GRID[1], _QUAD_GRID[1] ** 2], 1))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()


def adaptive(calibration: Calibration, mode: str = "host", **kw) -> "AdaptivePolicy":
    """The adaptive policy in its host form (per-level decisions from the tree's scores) or device form (the step's
    shape decided before it starts: no host reads inside a step)."""
    if mode not in ("host", "device"):
        raise ValueError(f"adaptive mode {mode!r}: want 'host' or 'device'")
    return (AdaptiveHost if mode == "host" else AdaptiveDevice)(calibration, **kw)


class AdaptivePolicy(DraftStrategy):
    """What both forms share: the step-time model (the calibration, as a quadratic in tokens and width per
    step), the acceptance predictor, the online corrections of both, and learning from each step."""

    kind = "adaptive"
    has_model = True  # False: no draft model, the rollout chains alone (`drafting.runtime.rollout_drafts`)

    def __init__(self, calibration: Calibration, predictor: AcceptancePredictor | None = None, topk: int = 2,
                 widths: tuple[int, ...] = (1, 2, 4), max_depth: int = 8):
        super().__init__("adaptive", max_depth, topk, 0, max(widths))
        self.cal = calibration
        self.predictor = predictor or AcceptancePredictor()
        self.widths = tuple(sorted(widths))
        self.decision: dict = {}  # what the last step planned, for the engine's step log
        j = np.arange(CURVE)
        self._curve = PRIOR_ACCEPT ** (j + 1.0)  # EMA over steps: expected acceptance of a sample's j-th best node
        self._plain_run = 0
        self._B = self._ctx = 0  # this step's live samples and context
        self._vq, self._vq_memo = np.zeros(6), {}  # this step's verify-time quadratic
        # online corrections, realised / predicted (EMA over steps, per power-of-two bucket of live samples): the
        # profile's times drift with the machine and the workload (on the tiny world, steps at 64 live samples
        # ran 10-40% over the profile, steps at a few live samples matched it), and the nodes a selection picks
        # are those the predictor likes most, so at a full batch it likes them too much (the winner's curse)
        # ("chain": the rollout chains' accepted tokens over their prediction, apart from the model's nodes)
        self.corrections = {k: np.ones(CORRECTION_BUCKETS) for k in ("plain_ms", "draft_ms", "accepted", "chain")}
        self.correction = {k: 1.0 for k in self.corrections}  # this step's bucket

    @property
    def max_width(self) -> int:
        return max(self.widths)

    def _models(self, B: int, ctx: int) -> dict:
        """This step's verify quadratic and corrections (the same few (live, context) pairs recur step after
        step: their quadratics are memoised)."""
        key = (B, ctx // 16)
        if key not in self._vq_memo:
            self._vq_memo = {} if len(self._vq_memo) > 4096 else self._vq_memo
            self._vq_memo[key] = self._verify_quadratic(B, ctx // 16 * 16 + 8)
        self._vq = self._vq_memo[key]
        self.correction = {k: float(v[bucket(B)]) for k, v in self.corrections.items()}
        return self.correction

    def _verify_quadratic(self, B: int, ctx: int) -> np.ndarray:
        """The verify model at this step's live samples and context, as a quadratic in (tokens per sample, padded
        width): exact for the smooth families (both at most quadratic), and a few multiply-adds to evaluate."""
        n, t = _QUAD_GRID
        return _QUAD_PINV @ self.cal.verify_ms(B, B * n, t, ctx)

    def _verify_ms(self, tokens, width) -> np.ndarray:
        n, t = np.asarray(tokens, dtype=np.float64) / self._B, np.asarray(width, dtype=np.float64)
        c = self._vq
        return np.maximum(c[0] + c[1] * n + c[2] * t + c[3] * n * n + c[4] * n * t + c[5] * t * t, 1e-3)

    def _chain_rate(self, view: StepView) -> float:
        """Predicted committed tokens per ms of a step that verifies the rows' rollout chains alone (no draft model
        runs): the best prefix of all chain nodes by predicted path acceptance, as `select` would pick it."""
        if not view.chains or view.chain_score is None:
            return 0.0
        score = view.chain_score * self.correction["chain"]
        B = score.shape[0]
        order = np.argsort(-score.ravel(), kind="stable")
        K = int((score > 0).sum())
        gain = np.concatenate([[0.0], np.cumsum(score.ravel()[order[:K]])]) * self.correction["accepted"]
        width = 1 + np.concatenate([[0], np.maximum.accumulate(order[:K] % score.shape[1] + 1)])
        verify = self._verify_ms(B + np.arange(K + 1), width) * self.correction["draft_ms"]
        return float(((B + gain) / verify)[1:].max()) if K else 0.0

    # -- learning --------------------------------------------------------------------------------------------
    def step_done(self, log: dict) -> None:
        """Update the corrections from what the step really took and accepted (its admission of new requests
        and this policy's own time excluded: the models do not predict them)."""
        real_ms = 1000.0 * (log["t_total"] - log.get("t_policy", 0.0) - log.get("t_admit", 0.0))
        ratios = {}
        if log.get("plain"):
            ratios["plain_ms"] = real_ms / self.cal.plain_ms(log["live"], log["ctx"])
        elif "plan_predicted_ms" in log:
            ratios["draft_ms"] = real_ms / max(log["plan_predicted_ms"], 1e-6)
            if log["plan_predicted_accepted"] > 0.5:
                ratios["accepted"] = log["accepted"] / log["plan_predicted_accepted"]
            if log.get("plan_predicted_chain", 0.0) > 0.5:  # (its own correction is already in the prediction)
                ratios["chain"] = (self.correction["chain"] * log.get("chain_accepted", 0)
                                   / log["plan_predicted_chain"])
        b = bucket(log["live"])
        for k, r in ratios.items():
            self.corrections[k][b] = 0.9 * self.corrections[k][b] + 0.1 * min(max(r, 0.5), 2.0)

    def observe(self, record: dict) -> bool:
        """The tested nodes' records into the predictor; True when it refitted."""
        predicted = record.get("predicted")
        return self.predictor.observe(record["features"].cpu().numpy(), record["accepted"].cpu().numpy(),
                                      None if predicted is None else predicted.cpu().numpy())

    def reset(self) -> None:
        """The draft changed: forget its acceptance records; the predictor refits on new ones."""
        self.predictor.reset()


class AdaptiveHost(AdaptivePolicy):
    """Decides as the tree grows, reading its scores between levels: plan, then `deeper` after each level, then
    `select` over all samples' nodes. Free on a CPU, where nothing is asynchronous."""

    host_decisions = True
    mode = "host"

    def __init__(self, calibration: Calibration, **kw):
        super().__init__(calibration, **kw)
        j = np.arange(CURVE)
        self._levels = j + 1.0  # EMA: levels drafted to reach a sample's best j + 1 nodes
        self._width_used = 1
        self._steps = 0
        self._bar, self._per_token = None, 0.0  # this step's: tokens a node must bring, verify ms per token
        self._spent_ms = 0.0  # this step's predicted draft time so far
        self._policy_ms, self._score_s = 0.0, 0.0  # this policy's own time per drafted level (EMA), last scoring
        self._policy_spent = 0.0  # the part of _spent_ms that is this policy's own time
        # the tree's path acceptance / own acceptance / depth / sibling rank as numpy (small arrays: cheaper)
        self._score = self._cond = self._path = np.zeros((0, 0))  # (_score: _path less duplicates of chain nodes)
        self._chain_cond = np.zeros((0, 0))  # this step's chains' own estimates (`ChainPredictor`)
        self._depth = self._rank = np.zeros(0, dtype=np.int64)
        self._chain = 0  # this step's rollout chain nodes (the tree's first), never expanded

    def wants_records(self) -> bool:
        return True

    def plan(self, view: StepView) -> bool:
        """Draft if the best predicted drafting rate beats plain decoding. The draft's catch-up on tokens it
        missed during plain steps is left out of the comparison: it is paid whenever drafting resumes."""
        B, ctx = self._B, self._ctx = view.live, view.context
        self._score = self._cond = self._path = np.zeros((B, 0))  # a new tree
        self._bar, self._per_token = None, 0.0
        self._policy_spent = 0.0
        self._spent_ms = self.cal.root_ms(B, max(view.draft_lag, 1), ctx)  # the draft's catch-up forward
        corr = self._models(B, ctx)
        plain_rate = B / (self.cal.plain_ms(B, ctx) * corr["plain_ms"])
        c = np.arange(1, CURVE + 1)
        spec_rate = 0.0
        if self.has_model:
            ms = (self.cal.root_ms(B, 2, ctx)
                  + np.maximum(self._levels - 1, 0) * self.cal.level_ms(B, self._width_used, ctx)
                  + self._verify_ms(B * (1 + c), 1 + c)) * corr["draft_ms"]
            spec_rate = float(((B + B * corr["accepted"] * np.cumsum(self._curve)) / ms).max())
        chain_rate = self._chain_rate(view)
        probe = self._plain_run >= PROBE_AFTER
        draft = max(spec_rate, chain_rate) > plain_rate or probe
        self._plain_run = 0 if draft else self._plain_run + 1
        self.decision = {"plain_rate": plain_rate, "spec_rate": spec_rate, "chain_rate": chain_rate}
        # the model's tree holds the chains too (its curve learnt from such trees): the chains alone only where
        # the model's drafting does not pay (or there is no model)
        if draft and (spec_rate <= plain_rate and not probe or not self.has_model):
            if not view.chains:
                return False
            self._spent_ms = 0.0  # no draft model runs
            return "chain"
        return draft

    def score(self, tree: DraftTree, view: StepView) -> None:
        """Predicted acceptance of the nodes drafted since the last call; path acceptance = parent's x own."""
        t0 = time.perf_counter()
        done = self._score.shape[1]
        B, N = tree.tokens.shape
        D = self._chain = 0 if view.chain_score is None else view.chain_score.shape[1]
        depth, rank = _np(tree.depth).copy(), _np(tree.rank)
        depth[:D] = 1  # a chain needs no model level: for planning, its nodes are all at the first
        lo = max(done, D)  # the model's new nodes (a chain's are scored by its own predictor, below)
        feats = np.empty((B, N - lo, 6))
        for j, t in enumerate((tree.value, tree.q, tree.margin)):
            feats[..., j] = _np(t)[:, lo:]
        feats[..., 3], feats[..., 4] = depth[lo:], rank[lo:]
        feats[..., 5] = _np(view.temperature)[:, None]
        cond = np.concatenate([self._cond, np.zeros((B, lo - done)),
                               self.predictor.predict(feats.reshape(-1, 6)).reshape(B, N - lo)], 1)
        score = np.concatenate([self._path, cond[:, done:]], 1)
        parents, rows = _np(tree.parents), np.arange(B)[:, None]
        for d in range(int(depth[done]), int(depth[-1]) + 1):  # new levels, parents before children
            idx = np.arange(done, N) if depth[done] == depth[-1] else done + np.nonzero(depth[done:] == d)[0]
            if d > 1:
                score[:, idx] *= score[rows, parents[:, idx]]
        if done == 0 and D:  # the rollout chains, scored by their own predictor (`RolloutDrafts.stage`)
            self._chain_cond = view.chain_score / np.maximum(
                np.concatenate([np.ones((B, 1)), view.chain_score[:, :-1]], 1), 1e-9)
            cond[:, :D] = self._chain_cond
            score[:, :D] = view.chain_score * self.correction["chain"]  # (until `_merge_chains`)
        self._path, self._cond, self._depth, self._rank = score, cond, depth, rank
        self._score = score
        tree.score.copy_(torch.from_numpy(score))  # into the drafter's buffers: the next level reads them there
        if tree.cond is None:
            tree.cond = torch.from_numpy(cond).to(tree.score.device)
        else:
            tree.cond.copy_(torch.from_numpy(cond))
        self._score_s = time.perf_counter() - t0

    def _merge_chains(self, tree: DraftTree, view: StepView) -> None:
        """The chains against the model's finished tree. Where the model's nodes spell a chain's first r tokens the
        two are one branch: the chain goes on from the model's node (`graft_chain`), whose estimate (read off the
        draft's probabilities) stands for the shared prefix, and the chain's own first r nodes drop out. The first
        node the chain adds there is bounded by the model's other children of that node (the target picks one
        token), and the chain's nodes are scored as that node's path times their own acceptance, times what the
        chains realised over their predictions lately."""
        D, path, cond = self._chain, self._path, self._cond
        B, N = path.shape
        if not D or N == D or not view.chains:
            return
        tokens, parents, depth = _np(tree.tokens), _np(tree.parents), _np(tree.depth)
        rows = np.arange(B)
        spelled, other = np.full((B, D), -1), np.zeros((B, D))
        prev, alive = np.full(B, -1), np.ones(B, dtype=bool)
        for d in range(1, D + 1):
            idx = D + np.nonzero(depth[D:] == d)[0]  # the model's nodes at depth d
            if not idx.size:
                break
            under = parents[:, idx] == prev[:, None]  # children of the chain's prefix so far (the root at first)
            same = under & (tokens[:, idx] == view.chain_tokens[:, d - 1:d]) & alive[:, None]
            has = same.any(1)
            other[:, d - 1] = np.where(under & ~same, cond[:, idx], 0.0).sum(1)
            spelled[:, d - 1] = np.where(has, idx[same.argmax(1)], -1)
            alive &= has
            prev = np.where(has, spelled[:, d - 1], prev)
            if not alive.any():
                break
        r = np.cumprod(spelled >= 0, axis=1).sum(1)  # the prefix the model spells
        at = np.where(r > 0, spelled[rows, np.maximum(r - 1, 0)], -1)
        j = np.arange(D)[None, :]
        chain = self._chain_cond.copy()
        first = np.minimum(r, D - 1)
        chain[rows, first] = np.where(r < D, np.minimum(chain[rows, first], np.clip(1.0 - other[rows, first], 0, 1)),
                                      chain[rows, first])
        own = j >= r[:, None]
        base = np.where(r > 0, path[rows, np.maximum(at, 0)], 1.0)
        scores = np.where(own & (view.chain_tokens >= 0),
                          base[:, None] * np.cumprod(np.where(own, chain, 1.0), axis=1), 0.0)
        self._score = path.copy()
        self._score[:, :D] = scores * self.correction["chain"]
        cond[:, :D] = np.where(own, chain, 0.0)
        graft_chain(tree, torch.from_numpy(at).to(tree.parents.device), torch.from_numpy(r).to(tree.parents.device),
                    D)

    def _model_scores(self, view: StepView) -> np.ndarray:
        """The model's nodes alone (their own estimates, the chains left out): what the level decisions weigh, so
        that the model's tree grows as it would without rollout drafts; `select` then ranks both."""
        if not self._chain or not view.chains:  # (no chain this step: its nodes score 0)
            return self._score
        score = self._path.copy()
        score[:, :self._chain] = 0.0
        return score

    def deeper(self, tree: DraftTree, view: StepView) -> bool:
        """Marginal analysis: another level of width w pays if the expected tokens of the nodes it would add that
        are worth their verification, over what the level costs (draft forward, their verify time, this policy's
        own time per level), beat the rate of the best selection so far.

        The selection so far is the nodes above the bar (the expected tokens a node must bring to pay for its
        verification, from the exact prefix search at the first level); the exact search runs again in
        `select`. A full search per level would cost more than a level on a small batch."""
        if self._depth[-1] >= self.max_depth:
            return False
        t0 = time.perf_counter()
        B, ctx, score, corr = self._B, self._ctx, self._model_scores(view), self.correction
        if self._bar is None:  # the first level: the exact best prefix sets the bar
            best = self._best_prefix(score)
            n_tok, width = B + best["k"], best["width"]
            self._per_token = float(self._verify_ms(n_tok + B, width) - self._verify_ms(n_tok, width)) / B
            self._bar = best["rate"] * self._per_token * corr["draft_ms"] / corr["accepted"]
        chosen = score > self._bar
        count = chosen.sum(1)
        gain, k, width = corr["accepted"] * float(score[chosen].sum()), int(count.sum()), 1 + int(count.max())
        verify = float(self._verify_ms(B + k, width))
        now = (B + gain) / ((self._spent_ms + verify) * corr["draft_ms"])
        newest = self._depth == self._depth[-1]
        newest[:self._chain] = False  # (chain nodes are never expanded)
        # how much of a frontier node's acceptance its children keep, by sibling rank: the newest level's nodes
        # tell (their 90th percentile: the bound is meant to be reachable, not typical)
        keep = np.zeros(self.topk)
        for j in range(self.topk):
            c = np.sort(self._cond[:, newest & (self._rank == j)], axis=None)  # (np.quantile: 30x slower here)
            keep[j] = c[int(0.9 * (c.size - 1))] if c.size else 0.0
        p_new = -np.sort(-self._path[:, newest], axis=1)  # [B, M] best first
        best_w, best_rate = 0, now
        for w in self.widths:
            if w > p_new.shape[1]:
                break
            hypo = p_new[:, :w, None] * keep  # each frontier node's children, [B, w, topk]
            useful = hypo[hypo > self._bar]
            level = self.cal.level_ms(B, w, ctx) + self._policy_ms
            rate = ((B + gain + corr["accepted"] * useful.sum())
                    / ((self._spent_ms + level + verify + useful.size * self._per_token) * corr["draft_ms"]))
            if rate > best_rate:
                best_w, best_rate = w, rate
        if best_w:
            self.width = best_w
            self._spent_ms += self.cal.level_ms(B, best_w, ctx) + self._policy_ms
            self._policy_spent += self._policy_ms
            self._bar = now * self._per_token * corr["draft_ms"] / corr["accepted"]  # the rate moved: so does the bar
        # this policy's own time per level (scoring + deciding), an EMA: a level costs it too
        self._policy_ms = 0.9 * self._policy_ms + 0.1 * 1000 * (time.perf_counter() - t0 + self._score_s)
        return best_w > 0

    def select(self, tree: DraftTree, view: StepView) -> torch.Tensor:
        if self._score.shape[1] != tree.size:  # the rollout chains alone: no level asked for scores yet
            self.score(tree, view)
        self._merge_chains(tree, view)
        B, N = self._score.shape
        best = self._best_prefix(self._score)
        chosen = np.zeros(B * N, dtype=bool)
        chosen[best["order"][:best["k"]]] = True
        chain = chosen.reshape(B, N)[:, :self._chain]
        self.decision.update({"rate": best["rate"], "nodes": best["k"],
                              "predicted_chain": float(self._score[:, :self._chain][chain].sum()),
                              "predicted_accepted": best["gain"] / self.correction["accepted"],  # uncorrected
                              "predicted_ms": self._spent_ms - self._policy_spent + best["verify_ms"],  # models
                              "levels": tree.levels})
        self._steps += 1
        if self._steps % 4 == 1:  # an EMA over many steps: every fourth is enough
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
        rank[np.arange(B)[:, None], by_row] = np.arange(1, N + 1)  # each node's rank within its sample
        width = np.ones(K + 1)
        width[1:] += np.maximum.accumulate(rank.ravel()[order[:K]])
        gain = np.zeros(K + 1)
        np.cumsum(score.ravel()[order[:K]], out=gain[1:])
        gain *= self.correction["accepted"]
        verify = self._verify_ms(B + np.arange(K + 1), width)
        rate = (B + gain) / ((self._spent_ms + verify) * self.correction["draft_ms"])
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


class AdaptiveDevice(AdaptivePolicy):
    """Decides the whole step before it starts (`plan_shape`) from what earlier steps measured; inside the step
    the predictor scores nodes on the device (`score_nodes`) and each sample verifies its best nodes, and the
    verify stage summarises what the tree offered (`summarize`), brought back with the step's one copy."""

    mode = "device"

    def __init__(self, calibration: Calibration, **kw):
        super().__init__(calibration, **kw)
        # mean predicted acceptance of a sample's j-th best node in a tree of width w and depth <= d (EMA over
        # steps; optimistic prior where untried), and what the last step used
        W, D, k = len(self.widths), self.max_depth, self.topk
        self._shape_curve = np.zeros((W, D, CURVE))
        for wi, w in enumerate(self.widths):
            for d in range(D):
                pool = k + d * w * k
                self._shape_curve[wi, d, :pool] = self._curve[:pool]
        self._shape_used: tuple[int, int, int] | None = None  # (width index, levels, nodes)
        self._drafting_steps = 0
        self._dev = None  # device buffers (predictor parameters, tree statistics), made on first use

    def plan_shape(self, view: StepView) -> StepShape | None:
        """Plain, or the (width, levels, nodes per sample) with the best predicted rate: expected committed tokens
        (each sample's best `nodes` nodes, by what trees of that width and depth offered lately) over the
        modelled time of the catch-up, the levels and the verify."""
        t0 = time.perf_counter()
        self._device(view.temperature.device)  # the buffers the stages use exist before the first stage
        B, ctx = self._B, self._ctx = view.live, view.context
        corr = self._models(B, ctx)
        plain_rate = B / (self.cal.plain_ms(B, ctx) * corr["plain_ms"])
        if not self.has_model:  # the rollout chains alone: verify every row's chain where that beats plain
            chain_rate = self._chain_rate(view)
            self.decision = {"plain_rate": plain_rate, "chain_rate": chain_rate}
            self._shape_used = None
            if view.chains and (chain_rate > plain_rate or self._plain_run >= PROBE_AFTER):
                self._plain_run = 0
                return StepShape(0, 0, view.chain_score.shape[1])
            self._plain_run += 1
            return None
        c = np.arange(1, CURVE + 1)
        verify = self._verify_ms(B * (1 + c), 1 + c)  # [C]
        root = self.cal.root_ms(B, max(view.draft_lag, 1), ctx)
        level = np.array([self.cal.level_ms(B, w, ctx) for w in self.widths])  # [W]
        d = np.arange(1, self.max_depth + 1)
        ms = (root + (d[None, :, None] - 1) * level[:, None, None] + verify[None, None, :]) * corr["draft_ms"]
        gain = corr["accepted"] * np.cumsum(self._shape_curve, axis=2)  # [W, D, C]
        pool = self.topk + (d[None, :] - 1) * np.array(self.widths)[:, None] * self.topk  # [W, D]
        allowed = (c[None, None, :] <= pool[..., None]) & np.isin(c, NODE_MENU)[None, None, :]
        rate = np.where(allowed, B * (1 + gain) / ms, 0.0)
        wi, di, ci = np.unravel_index(int(rate.argmax()), rate.shape)
        spec_rate = float(rate[wi, di, ci])
        draft = spec_rate > plain_rate or self._plain_run >= PROBE_AFTER
        self._plain_run = 0 if draft else self._plain_run + 1
        self.decision = {"plain_rate": plain_rate, "spec_rate": spec_rate}
        if not draft:
            self._shape_used = None
            return None
        self._shape_used = (int(wi), int(di) + 1, int(ci) + 1)
        self.decision.update({"rate": spec_rate, "nodes": B * (int(ci) + 1), "levels": int(di) + 1,
                              "width": self.widths[wi],
                              "predicted_accepted": B * float(np.cumsum(self._shape_curve[wi, di])[ci]),
                              "predicted_ms": float(ms[wi, di, ci]) / corr["draft_ms"],
                              "policy_ms": 1000 * (time.perf_counter() - t0)})
        return StepShape(int(di) + 1, self.widths[wi], int(ci) + 1)

    def _device(self, device: torch.device):
        """Buffers the stages read and write: the predictor's parameters, and each step's tree statistics."""
        if self._dev is None:
            pinned = device.type == "cuda"
            self._dev = {"predictor": DevicePredictor(device),
                         "stats": torch.zeros(self.max_depth, CURVE, device=device),
                         "stats_host": torch.zeros(self.max_depth, CURVE, pin_memory=pinned)}
            self._dev["predictor"].load(self.predictor)
        return self._dev

    def score_nodes(self, drafter, B: int, lo: int, hi: int, temperature: torch.Tensor) -> None:
        """Predicted acceptance of nodes [lo, hi) given their parent (cond), and of their whole path (score)."""
        dev = self._dev
        sl = (slice(0, B), slice(lo, hi))
        M = hi - lo
        feats = torch.stack([drafter.value[sl], drafter.q[sl], drafter.margin[sl],
                             drafter.depth[lo:hi].float().expand(B, M), drafter.rank[lo:hi].float().expand(B, M),
                             temperature[:, None].float().expand(B, M)], dim=-1)  # [B, M, 6]
        cond = dev["predictor"](feats.reshape(B * M, 6)).view(B, M)
        par = drafter.parents[sl]
        parent = torch.where(par < 0, torch.ones_like(cond), drafter.score[:B].gather(1, par.clamp(min=0)))
        drafter.cond[sl] = cond
        drafter.score[sl] = parent * cond

    def summarize(self, tree: DraftTree, vt, acc, live: torch.Tensor, levels: int) -> None:
        """Mean over live samples of the j-th best node's predicted path acceptance among nodes of depth <= d,
        for every d up to this tree's depth: what trees of this shape offer, for the next steps' planning."""
        stats = self._dev["stats"]
        caps = tree.depth[None, :] <= torch.arange(1, levels + 1, device=stats.device)[:, None]  # [D, N]
        ok = caps[None] & (tree.score[:, None, :] > float("-inf"))  # node slots past the tree are -inf
        s = torch.where(ok, tree.score[:, None, :], 0.0).sort(dim=2, descending=True).values  # [B, D, N]
        w = live.float()
        mean = (s[..., :CURVE] * w[:, None, None]).sum(0) / w.sum().clamp(min=1.0)  # [D, min(N, C)]
        stats.zero_()
        stats[:levels, :mean.shape[1]] = mean

    def fetch_async(self) -> None:
        if self._dev is not None and self._shape_used is not None:
            self._dev["stats_host"].copy_(self._dev["stats"], non_blocking=True)

    def wants_records(self) -> bool:
        return self._drafting_steps % RECORD_EVERY == 0

    def _learn_shape(self) -> None:
        """The last drafting step's tree statistics into the curve of its width, for depths up to its own."""
        wi, levels, _ = self._shape_used
        stats = self._dev["stats_host"].numpy()
        a = 0.2
        for d in range(levels):
            pool = min(CURVE, self.topk + d * self.widths[wi] * self.topk)
            self._shape_curve[wi, d, :pool] = (1 - a) * self._shape_curve[wi, d, :pool] + a * stats[d, :pool]

    def step_done(self, log: dict) -> None:
        if not log.get("plain") and self._shape_used is not None:
            self._drafting_steps += 1
            self._learn_shape()
        super().step_done(log)

    def observe(self, record: dict) -> bool:
        refit = super().observe(record)
        if refit and self._dev is not None:  # the stages score with the device's copy of the predictor
            self._dev["predictor"].load(self.predictor)
        return refit
