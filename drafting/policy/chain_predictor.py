"""Acceptance of a rollout chain's nodes (`drafting.spec.suffix`), learnt per source.

A chain's node j is accepted when every node before it was and its token is the target's. What predicts that is
not a draft probability (a chain has none) but where the chain came from: its source (the sample's own prompt and
response, a sibling of its group, an earlier epoch), how long a suffix of the context it matched, how often that
continuation was seen, and the node's depth. The predictor keeps a Beta-smoothed rate of acceptance given the
parent per (source, match, count, depth) cell, counted over tested nodes only. A cell's prior is its source's
rate at that depth over all its cells, itself drawn from an optimistic prior: a source nobody has tried gets
verified and learnt, and a new cell of a source that has failed starts where the source is (with min_match 1 a
source has hundreds of cells, and an optimistic prior in each would verify failing chains until every one had
learnt). The adaptive policy ranks chain nodes by these rates beside the model's nodes (`drafting.policy.adaptive`)."""
from __future__ import annotations

import numpy as np

PRIOR, PRIOR_WEIGHT = 0.7, 2.0  # an untried source: accepted 0.7 given its parent, worth two observations
MATCH_CAP, COUNT_CAP = 8, 4  # match lengths and counts above these share a cell


class ChainPredictor:
    """P(node j of a chain accepted | node j - 1 accepted), by (source, match, count, depth)."""

    def __init__(self, sources: int, depth: int):
        shape = (sources, MATCH_CAP + 1, COUNT_CAP + 1, depth)
        self.accepted, self.tested = np.zeros(shape), np.zeros(shape)
        self.pooled_accepted, self.pooled_tested = np.zeros((sources, depth)), np.zeros((sources, depth))

    def cond(self, source: int, match: int, count: int, length: int) -> np.ndarray:
        """[length]: each node's acceptance given its parent's."""
        return self._conds(np.array([source]), np.array([match]), np.array([count]))[0, :length]

    def path_rates(self, source: np.ndarray, match: np.ndarray, count: np.ndarray) -> np.ndarray:
        """[N, depth]: the acceptance of each node of N chains at once (one step's rows), down its path: the product
        of the conditional rates down to it."""
        return np.cumprod(self._conds(source, match, count), axis=1)

    def _conds(self, source: np.ndarray, match: np.ndarray, count: np.ndarray) -> np.ndarray:
        m, c = np.minimum(match, MATCH_CAP), np.minimum(count, COUNT_CAP)
        a, t = self.accepted[source, m, c], self.tested[source, m, c]
        prior = (self.pooled_accepted[source] + PRIOR * PRIOR_WEIGHT) / (self.pooled_tested[source] + PRIOR_WEIGHT)
        return (a + prior * PRIOR_WEIGHT) / (t + PRIOR_WEIGHT)

    def observe(self, source: int, match: int, count: int, verified: int, matched: int, first: int = 0) -> None:
        """A verified chain's outcome: of its `verified` nodes from node `first` on (those before it were the model's
        nodes again: `drafting.spec.tree.graft_chain`), the first `matched` were the target's tokens. Those are tested
        and accepted; the next one, if verified, tested and rejected; deeper ones untested."""
        self.observe_many(*(np.array([v]) for v in (source, match, count, verified, matched, first)))

    def observe_many(self, source, match, count, verified, matched, first) -> None:
        """`observe` for N chains at once (arrays of N)."""
        d = np.arange(self.accepted.shape[-1])[None, :]
        ok = np.minimum(matched, verified)[:, None]
        start = first[:, None]
        acc = ((d >= start) & (d < start + ok)).astype(float)
        tst = ((d >= start) & (d < start + np.minimum(ok + 1, verified[:, None]))).astype(float)
        cell = (source, np.minimum(match, MATCH_CAP), np.minimum(count, COUNT_CAP))
        np.add.at(self.accepted, cell, acc)
        np.add.at(self.tested, cell, tst)
        np.add.at(self.pooled_accepted, source, acc)
        np.add.at(self.pooled_tested, source, tst)

    def rates(self) -> dict:
        """Observed acceptance given the parent, per source (over all its cells): for metrics and notes."""
        t = self.tested.sum(axis=(1, 2, 3))
        return {s: float(self.accepted[s].sum() / t[s]) if t[s] else None for s in range(len(t))}
