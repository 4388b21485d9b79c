"""The case's subtype from two opinions: the network's head and a linear model on lesion features, calibrated.

Three variants, all computed at every prediction:

- ``cnn``: the network's subtype head (the lesion-centred patch's logits), divided by a temperature;
- ``features``: a regularised linear model (shrinkage LDA or logistic regression, scikit-learn) on the radiomics of
  the predicted lesion (:mod:`nnunet_mtl.model.lesion_features`), divided by its temperature;
- ``fused``: the weighted sum of both log-probabilities, ``w * log p_cnn + (1 - w) * log p_features``, with ``w``
  chosen on held-out cases by macro-F1 (ties: lower NLL), then one more temperature. Without a predicted lesion there
  are no features and ``fused`` is ``cnn``.

Temperatures are fitted by NLL on held-out cases only (out-of-fold cases when cross-validation folds were trained,
the validation fold otherwise), and the number of cases each rests on is stored beside it: twelve cases calibrate
nothing reliably, and a reader must be able to see that. The network's temperature is never below 1 (a handful of
right answers must not make an already over-confident head sharper). With several folds, each fold's calibrated
probabilities are averaged.

The fitted model is stored as plain numbers in ``subtype_classifier.json`` in the model folder (imputation values,
standardisation, coefficients), so loading it runs no pickled code.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

VARIANTS = ("cnn", "features", "fused")
CLASSIFIER_FILE = "subtype_classifier.json"
FEATURE_MODELS = ("lda", "logistic")
FUSION_GRID = tuple(round(0.1 * i, 1) for i in range(11))
TEMPERATURE_BOUNDS = (0.05, 20.0)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, float)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, float)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def nll(logits: np.ndarray, y: Sequence[int]) -> float:
    """Mean negative log-likelihood of the true classes."""
    y = np.asarray(y, int)
    return float(-log_softmax(logits)[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: Sequence[int], minimum: float = TEMPERATURE_BOUNDS[0]) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) (Guo et al. 2017), searched on log T."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, float)
    if len(logits) == 0:
        return 1.0
    low, high = math.log(max(minimum, TEMPERATURE_BOUNDS[0])), math.log(TEMPERATURE_BOUNDS[1])
    result = minimize_scalar(lambda t: nll(logits / math.exp(t), y), bounds=(low, high), method="bounded")
    return float(math.exp(result.x))


@dataclass
class LinearSoftmax:
    """A fitted linear classifier as plain numbers: NaN -> training median, standardise, logits = X W^T + b."""

    feature_names: list[str]
    impute: list[float]
    mean: list[float]
    scale: list[float]
    coef: list[list[float]]
    intercept: list[float]
    kind: str = "lda"

    def matrix(self, rows: Sequence[Mapping[str, float]]) -> np.ndarray:
        """Standardised feature matrix in this model's column order (missing or NaN -> the training median)."""
        x = np.array([[float(r.get(n, math.nan)) for n in self.feature_names] for r in rows], float).reshape(
            len(rows), len(self.feature_names))
        x = np.where(np.isfinite(x), x, np.asarray(self.impute, float))
        return (x - np.asarray(self.mean, float)) / np.asarray(self.scale, float)

    def logits(self, rows: Sequence[Mapping[str, float]]) -> np.ndarray:
        return self.matrix(rows) @ np.asarray(self.coef, float).T + np.asarray(self.intercept, float)


def _estimator(kind: str, n_samples: int):
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegressionCV

    if kind == "lda":  # Ledoit-Wolf shrinkage: stable with more features than cases
        return LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")
    if kind == "logistic":
        folds = max(2, min(5, n_samples // 6))
        return LogisticRegressionCV(Cs=np.logspace(-3, 1, 9), cv=folds, class_weight="balanced", max_iter=5000,
                                    l1_ratios=(0.0,), scoring="neg_log_loss", use_legacy_attributes=False)
    raise ValueError(f"unknown feature model {kind!r}; choose one of {FEATURE_MODELS}")


def fit_linear(rows: Sequence[Mapping[str, float]], y: Sequence[int], n_classes: int, kind: str = "lda",
               feature_names: Sequence[str] | None = None) -> LinearSoftmax:
    """Fit the feature classifier on cases' feature dicts; the columns are the names every row has (or given)."""
    if feature_names is None:
        common = set(rows[0]).intersection(*rows[1:]) if rows else set()
        feature_names = sorted(common)
    names = list(feature_names)
    x = np.array([[float(r.get(n, math.nan)) for n in names] for r in rows], float)
    finite = np.isfinite(x)
    impute = np.array([np.median(x[finite[:, j], j]) if finite[:, j].any() else 0.0 for j in range(len(names))])
    x = np.where(finite, x, impute)
    mean, scale = x.mean(0), x.std(0)
    keep = scale > 1e-9  # constant columns carry nothing and break the standardisation
    names, impute, mean, scale, x = ([n for n, k in zip(names, keep) if k], impute[keep], mean[keep], scale[keep],
                                     x[:, keep])
    y = np.asarray(y, int)
    estimator = _estimator(kind, len(y)).fit((x - mean) / scale, y)
    coef, intercept = np.atleast_2d(estimator.coef_), np.atleast_1d(estimator.intercept_)
    if coef.shape[0] == 1:  # binary: scikit-learn keeps one row, the log-odds of the second class
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
    full_coef = np.zeros((n_classes, coef.shape[1]))
    full_intercept = np.full(n_classes, -1e3)  # a class absent from training is never predicted
    full_coef[estimator.classes_] = coef
    full_intercept[estimator.classes_] = intercept
    return LinearSoftmax(names, impute.tolist(), mean.tolist(), scale.tolist(), full_coef.tolist(),
                         full_intercept.tolist(), kind)


def cross_validated_logits(rows: Sequence[Mapping[str, float]], y: Sequence[int], n_classes: int, kind: str,
                           folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold logits of the feature model over the given cases (stratified folds): what it says of cases it
    was not fitted on, to calibrate it on more cases than a validation fold holds."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y, int)
    counts = np.bincount(y)
    k = int(min(folds, counts[counts > 0].min())) if len(y) else 0
    out = np.zeros((len(y), n_classes))
    if k < 2:
        return fit_linear(rows, y, n_classes, kind).logits(rows)
    for fit, held in StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y):
        model = fit_linear([rows[i] for i in fit], y[fit], n_classes, kind)
        out[held] = model.logits([rows[i] for i in held])
    return out


@dataclass
class SubtypeClassifier:
    """Everything the predictor needs to turn the head's logits and the lesion's features into probabilities."""

    class_names: list[str]
    feature_model: LinearSoftmax | None = None
    cnn_temperature: float = 1.0
    feature_temperature: float = 1.0
    fusion_weight: float = 1.0  # weight of the network's log-probabilities in ``fused``
    fused_temperature: float = 1.0
    default_variant: str = "fused"
    provenance: dict = field(default_factory=dict)  # what each number rests on (cases, source)
    validation: dict = field(default_factory=dict)  # held-out metrics of every variant

    def variant_logits(self, cnn_logits: Sequence[np.ndarray],
                       features: Mapping[str, float] | None) -> dict[str, list[np.ndarray]]:
        """Calibrated log-probabilities per variant and fold (``features`` None: no lesion, no feature opinion)."""
        cnn = [log_softmax(np.asarray(f, float) / self.cnn_temperature) for f in cnn_logits]
        out: dict[str, list[np.ndarray]] = {"cnn": cnn}
        if features is not None and self.feature_model is not None:
            feature = log_softmax(self.feature_model.logits([features])[0] / self.feature_temperature)
            out["features"] = [feature]
            w = self.fusion_weight
            out["fused"] = [log_softmax((w * c + (1 - w) * feature) / self.fused_temperature) for c in cnn]
        else:
            out["fused"] = cnn
        return out

    def probabilities(self, cnn_logits: Sequence[np.ndarray],
                      features: Mapping[str, float] | None) -> dict[str, np.ndarray]:
        """Probabilities per variant, each fold calibrated and then averaged; ``features`` variant only with a
        lesion."""
        return {k: np.mean([np.exp(v) for v in folds], axis=0)
                for k, folds in self.variant_logits(cnn_logits, features).items()}

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, content: dict) -> SubtypeClassifier:
        content = dict(content)
        model = content.pop("feature_model", None)
        return cls(feature_model=LinearSoftmax(**model) if model else None, **content)

    def save(self, model_dir: Path) -> Path:
        path = Path(model_dir) / CLASSIFIER_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(tmp, path)
        return path


def load_classifier(model_dir: Path) -> SubtypeClassifier | None:
    """The model folder's fitted classifier, or None for a model trained before it existed (network head only)."""
    path = Path(model_dir) / CLASSIFIER_FILE
    if not path.is_file():
        return None
    try:
        return SubtypeClassifier.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a valid subtype classifier file ({e})") from None
