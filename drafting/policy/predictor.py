"""Acceptance predictor: the probability that the target accepts a draft node given that its parent was
accepted, from what the draft already knows about the node. A node's probability of being on the accepted
path is the product of these along its path.

Fitted with scikit-learn on the engine's own accept/reject records and refitted online over a sliding window
(the actor changes during RLHF, and the draft with it): logistic regression on the node's features against
isotonic regression on its draft probability, whichever has the lower log-loss on the window's newest
records. Until enough records exist the draft probability itself is the prediction (EAGLE-2's assumption).
Calibration is scored prequentially: each node's prediction is made before its outcome is known."""
from __future__ import annotations

import functools
import warnings
from collections import deque

import numpy as np

# columns of the engine's node records (`SpeculativeEngine._record`)
FEATURES = ("value", "q", "margin", "depth", "rank", "temperature")
FAMILIES = ("logistic", "isotonic")


DEPTHS = 8  # depth enters as one indicator per level (the last one for 8 and deeper)


def design(feats: np.ndarray) -> np.ndarray:
    """[M, 6] records -> [M, 14] regression inputs: log path value, log own probability, clipped margin, first
    sibling or not, temperature, greedy flag, log own probability x depth, and one indicator per depth. A
    draft's confidence means less the further it drafts from the committed tokens (measured on the tiny world:
    rank-0 nodes at depth 8 were accepted 0.84 of the time, at depth 1 0.91, at similar draft probabilities),
    which a single linear depth term misses."""
    value, q, margin, depth, rank, temp = np.asarray(feats, dtype=np.float64).T
    out = np.zeros((len(q), 7 + DEPTHS))  # filled column by column: this runs on every drafted level
    np.log(np.maximum(value, 1e-9), out=out[:, 0])
    np.log(np.maximum(q, 1e-9), out=out[:, 1])
    np.minimum(np.maximum(margin, -20), 20, out=out[:, 2])
    out[:, 3] = rank == 0
    out[:, 4] = temp
    out[:, 5] = temp == 0
    np.multiply(out[:, 1], depth / DEPTHS, out=out[:, 6])
    out[np.arange(len(q)), 6 + np.minimum(depth, DEPTHS).astype(np.int64)] = 1.0
    return out


def design_torch(feats):
    """design() on the device (float32): the same 15 columns from [M, 6] records."""
    import torch

    value, q, margin, depth, rank, temp = feats.unbind(-1)
    logq = q.clamp(min=1e-9).log()
    onehot = torch.nn.functional.one_hot(depth.clamp(1, DEPTHS).long() - 1, DEPTHS).to(feats.dtype)
    return torch.cat([torch.stack([value.clamp(min=1e-9).log(), logq, margin.clamp(-20, 20), (rank == 0).to(feats.dtype),
                                   temp, (temp == 0).to(feats.dtype), logq * depth / DEPTHS], dim=-1), onehot], dim=-1)


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def calibration_table(pred: np.ndarray, outcome: np.ndarray, bins: int = 10) -> tuple[list[dict], float]:
    """Predicted vs observed acceptance per equal-width bin of the prediction, and the expected calibration
    error (bin-size weighted mean |observed - predicted|)."""
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(pred, edges) - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            p, o = float(pred[sel].mean()), float(outcome[sel].mean())
            rows.append({"bin": [round(edges[b], 2), round(edges[b + 1], 2)], "count": int(sel.sum()),
                         "predicted": round(p, 4), "observed": round(o, 4)})
            ece += sel.sum() / len(pred) * abs(o - p)
    return rows, float(ece)


@functools.cache
def _threadpools():
    """One controller per process: `threadpool_limits` scans the loaded libraries on every call (3 ms, more than
    a small fit's solver)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


class AcceptancePredictor:
    def __init__(self, window: int = 16000, refit_every: int = 4000, min_records: int = 200,
                 history: int = 200000):
        self.window, self.refit_every, self.min_records = window, refit_every, min_records
        self._X: deque = deque()  # (design rows, outcomes) chunks, newest last
        self._n = 0  # records in the window
        self._since_fit = self._fit_size = 0
        self.family: str | None = None  # None: the prior (draft probability)
        self.heldout_logloss: dict = {}
        self.fits = 0
        self._w = self._b = None  # logistic
        self._iso_x = self._iso_y = None  # isotonic thresholds
        self._preq: deque = deque(maxlen=history)  # (predicted, accepted) chunks, for calibration reports

    # -- prediction (hot path: small numpy arrays, cheaper per call than torch)
    def predict(self, feats: np.ndarray) -> np.ndarray:
        """[M, 6] node records -> [M] acceptance probability given the parent accepted."""
        if self.family == "logistic":
            return 1.0 / (1.0 + np.exp(-(design(feats) @ self._w + self._b)))
        q = np.asarray(feats, dtype=np.float64)[:, FEATURES.index("q")]
        if self.family == "isotonic":
            return np.interp(q, self._iso_x, self._iso_y)
        return np.minimum(np.maximum(q, 0.01), 0.99)  # (np.clip costs more than this on small arrays)

    # -- learning
    def observe(self, feats: np.ndarray, accepted: np.ndarray, predicted: np.ndarray | None = None) -> bool:
        """Add tested nodes' records; refit when enough new ones arrived. Returns whether it refitted."""
        X = np.array(feats, dtype=np.float64)  # raw records; design() runs at refit time, off the common path
        y = np.asarray(accepted, dtype=np.float64)
        if predicted is not None:
            self._preq.append((np.asarray(predicted, dtype=np.float64), y))
        self._X.append((X, y))
        self._n += len(y)
        self._since_fit += len(y)
        while self._n - len(self._X[0][1]) >= self.window:
            self._n -= len(self._X.popleft()[1])
        # refit after min_records new records, then after twice as many as at the last fit, up to refit_every:
        # early fits come fast (few records say little), later ones at a steady pace
        due = self._since_fit >= min(self.refit_every, max(self.min_records, self._fit_size))
        if due and self._n >= self.min_records:
            self.refit()
            return True
        return False

    def reset(self) -> None:
        """The draft or the actor changed: records of the old pair no longer describe the new one. The current
        fit stays in use until enough new records arrive."""
        self._X.clear()
        self._n = self._since_fit = 0

    def refit(self) -> None:
        """Fit both families on the older 80% of the window, score them on the newest 20%, keep the better one
        refitted on the whole window."""
        from sklearn.isotonic import IsotonicRegression
        from sklearn.linear_model import LogisticRegression

        X = design(np.concatenate([c[0] for c in self._X]))
        y = np.concatenate([c[1] for c in self._X])
        self._since_fit, self._fit_size = 0, len(y)
        if y.min() == y.max():  # one class only: nothing to separate
            return
        cut = int(0.8 * len(y))
        q = np.exp(X[:, 1])
        with warnings.catch_warnings(), _threadpools().limit(limits=1):  # a small fit inside a decoding step
            warnings.simplefilter("ignore")
            logit = LogisticRegression(C=1.0, max_iter=200).fit(X[:cut], y[:cut]) if y[:cut].min() != y[:cut].max() \
                else None
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(q[:cut], y[:cut])
            scores = {"isotonic": log_loss(y[cut:], iso.predict(q[cut:]))}
            if logit is not None:
                scores["logistic"] = log_loss(y[cut:], logit.predict_proba(X[cut:])[:, 1])
            best = min(scores, key=scores.get)
            if best == "logistic":
                logit = LogisticRegression(C=1.0, max_iter=200).fit(X, y)
                self._w, self._b = logit.coef_[0].copy(), float(logit.intercept_[0])
            else:
                iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(q, y)
                self._iso_x, self._iso_y = iso.X_thresholds_.copy(), iso.y_thresholds_.copy()
        self.family, self.heldout_logloss = best, scores
        self.fits += 1

    def calibration(self, bins: int = 10) -> dict:
        """Prequential calibration: every prediction was made before its node was verified."""
        if not self._preq:
            return {"bins": [], "ece": float("nan"), "records": 0}
        pred = np.concatenate([c[0] for c in self._preq])
        obs = np.concatenate([c[1] for c in self._preq])
        rows, ece = calibration_table(pred, obs, bins)
        return {"bins": rows, "ece": ece, "records": int(len(pred)), "family": self.family,
                "heldout_logloss": self.heldout_logloss, "fits": self.fits}


class DevicePredictor:
    """The fitted predictor as device tensors, evaluated inside a captured stage: the logistic weights, or the
    isotonic fit (or the prior) as a table over the draft probability on a uniform grid. `load` copies a new fit
    in place, so graphs captured earlier read it."""

    GRID = 1025

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.w = torch.zeros(7 + DEPTHS, device=self.device)
        self.b = torch.zeros(1, device=self.device)
        self.logistic = torch.zeros(1, device=self.device)  # 1.0: logistic, 0.0: the table
        self.table = torch.zeros(self.GRID, device=self.device)
        pinned = self.device.type == "cuda"
        self._staging = torch.zeros(2 * (7 + DEPTHS) + 1 + self.GRID + 1, pin_memory=pinned)

    def load(self, predictor: "AcceptancePredictor") -> None:
        """Copy the predictor's current fit (asynchronously from pinned memory on a GPU: no host sync)."""
        import torch

        grid = np.linspace(0.0, 1.0, self.GRID)
        w, b, logistic = np.zeros(7 + DEPTHS), 0.0, 0.0
        if predictor.family == "logistic":
            w, b, logistic = predictor._w, predictor._b, 1.0
            table = np.zeros(self.GRID)
        elif predictor.family == "isotonic":
            table = np.interp(grid, predictor._iso_x, predictor._iso_y)
        else:
            table = np.minimum(np.maximum(grid, 0.01), 0.99)
        flat = np.concatenate([w, [b, logistic], table]).astype(np.float32)
        n = len(flat)
        self._staging[:n].copy_(torch.from_numpy(flat))
        dev = self._staging[:n].to(self.device, non_blocking=True)
        k = 7 + DEPTHS
        self.w.copy_(dev[:k])
        self.b.copy_(dev[k:k + 1])
        self.logistic.copy_(dev[k + 1:k + 2])
        self.table.copy_(dev[k + 2:])

    def __call__(self, feats):
        """[M, 6] node records -> [M] acceptance probability given the parent accepted."""
        import torch

        feats = feats.float()
        logit = torch.sigmoid(design_torch(feats) @ self.w + self.b)
        x = feats[:, FEATURES.index("q")].clamp(0.0, 1.0) * (self.GRID - 1)
        lo = x.floor().long().clamp(max=self.GRID - 2)
        frac = x - lo
        table = self.table[lo] * (1 - frac) + self.table[lo + 1] * frac
        return torch.where(self.logistic > 0.5, logit, table)
