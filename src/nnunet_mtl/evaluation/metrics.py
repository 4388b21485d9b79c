"""Case-level metrics for segmentation (pancreas + lesion) and subtype classification, free of file I/O.

The trainer's validation reuses these functions, so every number the product reports comes from one place.

Segmentation (per case, labels 0 background, 1 normal pancreas, 2 lesion):

- ``dice_pancreas``: Dice of the whole pancreas (label > 0), the number the task asks for.
- ``dice_lesion``: Dice of the lesion (label == 2).
- ``dice_label1``: Dice of label 1 alone, only to compare with the technical report's "pancreas Dice"
  (which was label 1, not the whole pancreas).
- ``nsd_*``: normalised surface Dice (Nikolov et al.; Metrics Reloaded) at ``tolerance_mm``: the fraction of
  boundary voxels of either mask that lie within the tolerance of the other mask's boundary. Boundary voxels are
  mask voxels removed by one binary erosion (MONAI's ``compute_surface_dice`` without sub-voxel areas).
- ``hd95_*``: symmetric 95th-percentile Hausdorff distance in mm: the larger of the two directed 95th percentiles
  of boundary-to-boundary distances (MONAI's ``compute_hausdorff_distance(percentile=95)``).

Distances use the voxel spacing in (z, y, x) order, the order of arrays from ``SimpleITK.GetArrayFromImage``.

Empty-mask conventions (a structure is empty when it has no voxel in that mask):

=========================  ======  ======  ==============================================
case                       Dice    NSD     HD95
=========================  ======  ======  ==============================================
both empty                 1.0     1.0     0.0 (nothing to find, nothing found: perfect)
only one of them empty     0.0     0.0     the image diagonal in mm (worst distance possible
                                           inside the volume, so means stay finite and the
                                           case still ranks worst)
=========================  ======  ======  ==============================================

These matter for the lesion: a missed lesion or a lesion hallucinated in a lesion-free case scores 0 / 0 / diagonal.

Classification (per case): accuracy, balanced accuracy, per-class precision / recall / F1 / support, macro and
weighted averages, and the confusion matrix with rows = truth and columns = prediction, all from scikit-learn with
``zero_division=0`` (a class never predicted gets precision 0). With probabilities: one-vs-rest ROC AUC per class
(``None`` when the class is absent from, or the only class in, the truth) and its macro mean over the defined
classes; top-label calibration: the confidence is the largest probability, "correct" means its class is the truth,
and the expected calibration error is the count-weighted mean of |accuracy - confidence| over equal-width bins.
Undefined numbers are ``None`` so the dicts serialise to strict JSON.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

SEGMENTATION_METRICS = ("dice_pancreas", "dice_lesion", "dice_label1", "nsd_pancreas", "nsd_lesion",
                        "hd95_pancreas", "hd95_lesion")
METRIC_LABELS = {
    "dice_pancreas": "Dice whole pancreas (label > 0)",
    "dice_lesion": "Dice lesion (label 2)",
    "dice_label1": "Dice label 1 only",
    "nsd_pancreas": "NSD whole pancreas",
    "nsd_lesion": "NSD lesion",
    "hd95_pancreas": "HD95 whole pancreas (mm)",
    "hd95_lesion": "HD95 lesion (mm)",
}
DEFAULT_TOLERANCE_MM = 2.0
DEFAULT_CALIBRATION_BINS = 10

EMPTY_CASE_CONVENTIONS = {
    "dice": "both masks empty -> 1.0; exactly one empty -> 0.0",
    "nsd": "both masks empty -> 1.0; exactly one empty -> 0.0",
    "hd95": "both masks empty -> 0.0 mm; exactly one empty -> image diagonal in mm (worst possible)",
    "confusion_matrix": "rows = truth, columns = prediction",
    "undefined": "null (e.g. AUC of a class absent from the truth)",
}


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (a correctly predicted absence)."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {truth.shape}")
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def surface_metrics(pred: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float],
                    tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> tuple[float, float]:
    """(normalised surface Dice at ``tolerance_mm``, HD95 in mm) of two boolean masks, with the module's empty rules.

    MONAI does the distance work; the empty cases are settled here because MONAI returns NaN or inf for them.
    """
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {truth.shape}")
    if len(spacing_zyx) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing_zyx)} does not match a {pred.ndim}D mask")
    pred_any, truth_any = bool(pred.any()), bool(truth.any())
    if not pred_any and not truth_any:
        return 1.0, 0.0
    if not pred_any or not truth_any:
        diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing_zyx)))
        return 0.0, diagonal
    # MONAI wants one-hot, batch-first tensors: [batch 1, channel 1, z, y, x].
    p = torch.from_numpy(pred[None, None].astype(np.float32))
    t = torch.from_numpy(truth[None, None].astype(np.float32))
    spacing = [float(s) for s in spacing_zyx]
    with warnings.catch_warnings():  # MONAI 1.5+ trips over its own deprecated argument on every call
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        nsd = compute_surface_dice(p, t, class_thresholds=[float(tolerance_mm)], include_background=True,
                                   spacing=spacing)
        hd95 = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)
    return float(nsd.item()), float(hd95.item())


def segmentation_metrics(pred_arr: np.ndarray, truth_arr: np.ndarray, spacing_zyx: Sequence[float],
                         tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> dict[str, float]:
    """All per-case segmentation metrics (``SEGMENTATION_METRICS``) plus truth / predicted volumes in millilitres.

    ``pred_arr`` and ``truth_arr`` are label maps (0 / 1 / 2) on the same voxel grid, in (z, y, x) order.
    """
    pred_arr, truth_arr = np.asarray(pred_arr), np.asarray(truth_arr)
    if pred_arr.shape != truth_arr.shape:
        raise ValueError(f"label map shapes differ: {pred_arr.shape} vs {truth_arr.shape}")
    result: dict[str, float] = {}
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    for name, pred, truth in (("pancreas", pred_arr > 0, truth_arr > 0), ("lesion", pred_arr == 2, truth_arr == 2)):
        result[f"dice_{name}"] = dice(pred, truth)
        result[f"nsd_{name}"], result[f"hd95_{name}"] = surface_metrics(pred, truth, spacing_zyx, tolerance_mm)
        result[f"truth_{name}_ml"] = int(truth.sum()) * voxel_ml
        result[f"pred_{name}_ml"] = int(pred.sum()) * voxel_ml
    result["dice_label1"] = dice(pred_arr == 1, truth_arr == 1)
    return result


def calibration(y_true: np.ndarray, probabilities: np.ndarray, n_bins: int = DEFAULT_CALIBRATION_BINS) -> dict:
    """Top-label reliability bins and expected calibration error (equal-width bins, (lower, upper], 0 in bin 1)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        members = index == b
        count = int(members.sum())
        accuracy = float(correct[members].mean()) if count else None
        mean_confidence = float(confidence[members].mean()) if count else None
        if count:
            ece += count / len(y_true) * abs(accuracy - mean_confidence)
        bins.append({"lower": b / n_bins, "upper": (b + 1) / n_bins, "count": count,
                     "accuracy": accuracy, "confidence": mean_confidence})
    return {"ece": ece, "n_bins": n_bins, "bins": bins}


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], probabilities: np.ndarray | None = None,
                           class_names: Sequence[str] | None = None,
                           n_bins: int = DEFAULT_CALIBRATION_BINS) -> dict:
    """Every case-level classification number the product reports, as a JSON-ready dict.

    The number of classes is ``len(class_names)``, else the probabilities' width, else the largest label + 1; classes
    that never occur still get a row and a column, so confusion matrices of different runs line up.
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape or len(y_true) == 0:
        raise ValueError(f"need two equally long, non-empty label lists, got {y_true.shape} and {y_pred.shape}")
    probs = None if probabilities is None else np.asarray(probabilities, dtype=float)
    if class_names is not None:
        n_classes = len(class_names)
    elif probs is not None:
        n_classes = probs.shape[1]
    else:
        n_classes = int(max(y_true.max(), y_pred.max())) + 1
    names = list(class_names) if class_names is not None else [f"subtype {k}" for k in range(n_classes)]
    labels = list(range(n_classes))
    outside = sorted(set(np.concatenate([y_true, y_pred]).tolist()) - set(labels))
    if outside:
        raise ValueError(f"labels {outside} outside 0..{n_classes - 1}")
    if probs is not None and probs.shape != (len(y_true), n_classes):
        raise ValueError(f"probabilities have shape {probs.shape}, expected {(len(y_true), n_classes)}")

    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                     zero_division=0)
    result = {
        "n_cases": len(y_true),
        "class_names": names,
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "per_class": [{"label": k, "name": names[k], "precision": float(precision[k]), "recall": float(recall[k]),
                       "f1": float(f1[k]), "support": int(support[k])} for k in labels],
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "auc_ovr": None,
        "calibration": None,
    }
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average,
                                                     zero_division=0)
        result[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    if probs is not None:
        per_class = []
        for k in labels:
            positives = y_true == k
            defined = 0 < positives.sum() < len(y_true)
            per_class.append(float(roc_auc_score(positives, probs[:, k])) if defined else None)
        defined_aucs = [a for a in per_class if a is not None]
        result["auc_ovr"] = {"per_class": per_class,
                             "macro": float(np.mean(defined_aucs)) if defined_aucs else None}
        result["calibration"] = calibration(y_true, probs, n_bins)
    return result
