"""Calibration of one (target, draft, dtype, device, threads): the profiled step timings, the step-time model
fitted on them, and the throughput roofline with its saturation point.

The engine's adaptive strategy and the load balancer read the same JSON file, written by
`python -m drafting.profile`. A file made for other models, dtype, device or thread count is refused: timings
do not transfer. The file keeps the raw timings and the chosen model family per component; the models are
refitted on load (small data, deterministic), so the file stays readable and version-proof."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

VERSION = 1
# columns of each component's samples (the last one is the time in ms)
COLUMNS = {
    "plain": ("live", "ctx"),  # a whole plain step
    "root": ("live", "lag", "ctx"),  # the draft catching up on `lag` tokens per sample + the root's children
    "level": ("live", "width", "ctx"),  # one draft level over `width` frontier nodes per sample
    "verify": ("live", "tokens", "width", "ctx"),  # target verify of `tokens` packed nodes (padded `width`)
}
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size")


class CalibrationError(ValueError):
    """A calibration file that cannot be used here; the message is one line naming the file and why."""


def model_shape(config) -> dict:
    """The parts of an HF config that decide step time (not the weights, which RLHF changes)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: d.get(k) for k in SHAPE_KEYS}


def calibration_key(target_config, draft_config, dtype: str, device: str, threads: int) -> dict:
    shapes = {"target": model_shape(target_config), "draft": model_shape(draft_config) if draft_config else None}
    models = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]
    return {"models": models, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
            "threads": int(threads), "version": VERSION}


def key_name(key: dict) -> str:
    return f"{key['models']}-{key['dtype']}-{key['device'].replace(' ', '_').replace(':', '')}-t{key['threads']}"


# ---- the step-time model -----------------------------------------------------------------------------------
def _physics(component: str, X: np.ndarray) -> np.ndarray:
    """Features in which a step's time is close to linear: matmul work ~ tokens, attention ~ tokens x context."""
    if component == "plain":
        B, ctx = X.T
        return np.stack([B, B * ctx], axis=1)
    if component in ("root", "level"):
        B, w, ctx = X.T
        return np.stack([B, B * w, B * w * ctx], axis=1)
    B, N, T, ctx = X.T
    return np.stack([B, N, B * T * ctx, N * ctx], axis=1)


def _family(name: str, component: str):
    from sklearn.linear_model import LinearRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, PolynomialFeatures, StandardScaler

    if name == "linear":  # non-negative weights: more work never takes less time
        return make_pipeline(FunctionTransformer(lambda X: _physics(component, X)), LinearRegression(positive=True))
    if name == "poly2":
        return make_pipeline(StandardScaler(), PolynomialFeatures(2), Ridge(alpha=1e-3))
    raise ValueError(f"unknown step-model family {name!r}")


# Smooth families only: the selection weighs each extra node against the marginal cost of verifying it, and a
# tree ensemble's piecewise-constant prediction says that cost is zero almost everywhere (a monotone boosted
# model won the cross-validation by 1-2 points on one profile and then drafted without limit).
FAMILIES = ("linear", "poly2")


def _closed_form(name: str, component: str, model):
    """The fitted model as plain numpy: sklearn's per-call overhead would dominate the per-step selection,
    which evaluates the model many times."""
    if name == "linear":
        reg = model[-1]
        w, b = reg.coef_.copy(), float(reg.intercept_)
        return lambda X: _physics(component, X) @ w + b
    if name == "poly2":
        scaler, poly, reg = model
        mean, scale, powers = scaler.mean_.copy(), scaler.scale_.copy(), poly.powers_.astype(np.float64)
        w, b = reg.coef_.copy(), float(reg.intercept_)
        return lambda X: np.prod(((X - mean) / scale)[:, None, :] ** powers[None], axis=2) @ w + b
    raise ValueError(f"unknown step-model family {name!r}")


def _mape(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - y) / np.maximum(y, 1e-9)))


def choose_family(component: str, X: np.ndarray, y: np.ndarray) -> tuple[str, dict, np.ndarray]:
    """Each family's 5-fold cross-validated relative error; the best family wins. Also returns the winner's
    held-out predictions."""
    from sklearn.model_selection import KFold, cross_val_predict
    from threadpoolctl import threadpool_limits

    folds = KFold(n_splits=min(5, len(y)), shuffle=True, random_state=0)
    errors, preds = {}, {}
    with warnings.catch_warnings(), threadpool_limits(1):  # tiny fits: threads only contend
        warnings.simplefilter("ignore")
        for name in FAMILIES:
            preds[name] = cross_val_predict(_family(name, component), X, y, cv=folds)
            errors[name] = _mape(y, preds[name])
    best = min(errors, key=errors.get)
    return best, errors, preds[best]


@dataclass
class Calibration:
    key: dict
    samples: dict  # component -> list of rows (COLUMNS[component] + ms)
    families: dict = field(default_factory=dict)  # component -> chosen family
    cv_error: dict = field(default_factory=dict)  # component -> {family: relative error}
    step_cv_error: float = float("nan")  # whole-step relative error of the chosen models, cross-validated
    roofline: dict = field(default_factory=dict)  # {"live", "tokens_per_s", "ctx", "saturation_live"}
    meta: dict = field(default_factory=dict)
    path: str | None = None

    def __post_init__(self):
        self._models, self._fast, self._memo, self._tables = {}, {}, {}, {}

    # -- fitting
    def fit(self, choose: bool = True) -> "Calibration":
        """Fit each component's model (choosing the family by cross-validation when asked), then the roofline."""
        from threadpoolctl import threadpool_limits

        heldout = {}
        for comp in COLUMNS:
            X, y = self._xy(comp)
            if choose or comp not in self.families:
                self.families[comp], self.cv_error[comp], pred = choose_family(comp, X, y)
                heldout[comp] = (y, pred)
            with warnings.catch_warnings(), threadpool_limits(1):
                warnings.simplefilter("ignore")
                self._models[comp] = _family(self.families[comp], comp).fit(X, y)
            self._fast[comp] = _closed_form(self.families[comp], comp, self._models[comp])
        self._memo.clear()
        if len(heldout) == len(COLUMNS):
            self.step_cv_error = self._step_cv_error(heldout)
        self.roofline = self._roofline()
        self._tabulate()
        return self

    def _xy(self, comp: str) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(self.samples[comp], dtype=np.float64)
        if rows.ndim != 2 or len(rows) < 5:
            raise CalibrationError(f"calibration {self.path or ''}: too few '{comp}' timings ({len(rows)})")
        return rows[:, :-1], rows[:, -1]

    def _step_cv_error(self, preds: dict) -> float:
        """Relative error of predicted speculative step times (root + levels + verify), each part predicted by a
        model that did not see it: the error the selection works with."""
        steps = self.meta.get("steps", [])  # [(root row, [level rows], verify row)] indices of whole steps
        if not steps:
            return float(np.mean([_mape(*preds[c]) for c in COLUMNS]))
        y_true, y_pred = [], []
        for root, levels, verify in steps:
            parts = [("root", root), ("verify", verify)] + [("level", i) for i in levels]
            y_true.append(sum(preds[c][0][i] for c, i in parts))
            y_pred.append(sum(preds[c][1][i] for c, i in parts))
        return _mape(np.array(y_true), np.array(y_pred))

    # -- prediction (milliseconds)
    def predict(self, comp: str, X: np.ndarray) -> np.ndarray:
        return np.maximum(self._fast[comp](np.asarray(X, dtype=np.float64)), 1e-3)

    def _tabulate(self) -> None:
        """The scalar components on a grid (live 1..max_slots, catch-up 1..64 tokens, widths 1..8, context in
        steps of 8), predicted once: the per-step policy then reads a table instead of calling a model."""
        S, L = int(self.meta.get("max_slots", 64)), int(self.meta.get("max_len", 256))
        ctx = np.arange(0, L + 8, 8, dtype=np.float64)
        live = np.arange(0, S + 1, dtype=np.float64)
        self._tables = {}
        for comp, mid in (("plain", None), ("root", np.arange(0, 65)), ("level", np.arange(0, 9))):
            axes = [live] + ([] if mid is None else [mid.astype(np.float64)]) + [ctx]
            grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))
            self._tables[comp] = self.predict(comp, np.maximum(grid, 1)).reshape([len(a) for a in axes])

    def _scalar(self, comp: str, *x: int) -> float:
        """One prediction from the table (context to the nearest 8 tokens); outside it, a memoised model call."""
        table = self._tables.get(comp)
        c = (x[-1] + 4) // 8
        if table is not None and all(0 <= v < n for v, n in zip((*x[:-1], c), table.shape)):
            return float(table[(*x[:-1], c)])
        key = (comp, *x)
        if key not in self._memo:
            self._memo[key] = float(self.predict(comp, [x])[0])
        return self._memo[key]

    def plain_ms(self, live: int, ctx: int) -> float:
        return self._scalar("plain", live, ctx)

    def root_ms(self, live: int, lag: int, ctx: int) -> float:
        return self._scalar("root", live, lag, ctx)

    def level_ms(self, live: int, width: int, ctx: int) -> float:
        return self._scalar("level", live, width, ctx)

    def verify_ms(self, live: int, tokens: np.ndarray, width: np.ndarray, ctx: int) -> np.ndarray:
        """Verify time for many candidate selections at once: tokens, width [K] (packed tokens incl. roots, and
        the padded width 1 + most nodes of one sample)."""
        tokens, width = np.asarray(tokens, dtype=np.float64), np.asarray(width, dtype=np.float64)
        X = np.stack([np.full_like(tokens, live), tokens, width, np.full_like(tokens, ctx)], axis=1)
        return self.predict("verify", X)

    # -- roofline
    def _roofline(self) -> dict:
        """Committed tokens/s of plain decoding against live samples, at the profile's middle context; the
        saturation point is the fewest live samples that reach 90% of the best throughput."""
        live_max = int(self.meta.get("max_slots", max(r[0] for r in self.samples["plain"])))
        ctx = int(self.meta.get("roofline_ctx", np.median([r[1] for r in self.samples["plain"]])))
        live = np.arange(1, live_max + 1)
        tps = live / (self.predict("plain", np.stack([live, np.full_like(live, ctx)], 1)) / 1000.0)
        best = float(tps.max())
        saturation = int(live[np.argmax(tps >= 0.9 * best)])
        return {"live": live.tolist(), "tokens_per_s": [round(float(t), 2) for t in tps], "ctx": ctx,
                "saturation_live": saturation}

    @property
    def saturation_live(self) -> int:
        return int(self.roofline["saturation_live"])

    # -- files
    def to_json(self) -> dict:
        return {"version": VERSION, "key": self.key, "samples": self.samples, "families": self.families,
                "cv_error": self.cv_error, "step_cv_error": self.step_cv_error, "roofline": self.roofline,
                "meta": self.meta}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)  # atomic: a reader never sees half a file
        self.path = str(path)
        return path


def drafting_friendly(key: dict) -> Calibration:
    """A calibration from a formula under which drafting pays at any batch size (a step's fixed cost dwarfs its
    tokens'): for exactness checks, where `adaptive` must draft and take both its accept and reject paths."""
    samples = {"plain": [], "root": [], "level": [], "verify": []}
    for B in (1, 4, 16, 64, 256):
        for c in (8, 32):
            samples["plain"].append([B, c, 10.0 + 0.001 * B])
            for w in (1, 2, 4):
                samples["root"].append([B, w, c, 0.1 + 0.0001 * B * w])
                samples["level"].append([B, w, c, 0.1 + 0.0001 * B * w])
            for n in (0, 1, 4, 8):
                samples["verify"].append([B, B * (1 + n), 1 + n, c, 10.0 + 0.001 * B * (1 + n)])
    return Calibration(dict(key), samples, meta={"max_slots": 256, "roofline_ctx": 16}).fit()


def load_calibration(path: str | Path, expect_key: dict | None = None) -> Calibration:
    """Read and refit a calibration file; refuse one made for other models, dtype, device or threads."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CalibrationError(f"calibration file {path} is not valid JSON ({e.msg})") from None
    if raw.get("version") != VERSION:
        raise CalibrationError(f"calibration file {path} has version {raw.get('version')}, this engine reads "
                               f"{VERSION}: profile again (python -m drafting.profile)")
    if expect_key is not None and raw.get("key") != expect_key:
        have, want = raw.get("key", {}), expect_key
        diff = ", ".join(f"{k} {have.get(k)!r} (here {want[k]!r})" for k in want if have.get(k) != want[k])
        raise CalibrationError(f"calibration file {path} was made for other models or hardware: {diff}; "
                               f"profile this pair here (python -m drafting.profile)")
    cal = Calibration(raw["key"], raw["samples"], raw.get("families", {}), raw.get("cv_error", {}),
                      raw.get("step_cv_error", float("nan")), raw.get("roofline", {}), raw.get("meta", {}),
                      str(path))
    return cal.fit(choose=False)


def cache_dir() -> Path:
    env = os.environ.get("RLHFSPEC_CALIBRATION_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlhfspec" / "calibration"


def as_calibration(spec, key: dict) -> Calibration:
    """A `Calibration` (checked against this engine's key) or a file path (loaded and checked)."""
    if isinstance(spec, Calibration):
        if spec.key != key:
            raise CalibrationError(f"calibration {spec.path or '(in memory)'} was made for {spec.key}, "
                                   f"this engine is {key}")
        return spec
    return load_calibration(spec, key)
