"""Lesion-wise detection metrics, free of file I/O: what case-mean lesion Dice hides.

Case-mean Dice weighs a missed 0.1 ml lesion and a half-covered 9 ml one alike and cannot see a false lesion in a
case that also holds a true one. Here every lesion counts on its own.

**Components.** True and predicted lesions are the connected components of label 2 with 26-connectivity (voxels
touching by a face, an edge or a corner), as nnU-Net's largest-component postprocessing and
``inference.predictor.lesion_centre`` label them.

**Matching rule.** A true lesion T and a predicted component P *match* when IoU(T, P) > ``iou_threshold`` (0.1).

- A true lesion is *detected* when at least one predicted component matches it. Several predicted components may
  match one true lesion (a lesion predicted in pieces) and one predicted component may match several true lesions
  (neighbours merged into one blob): every such pair counts, nobody is counted twice as missed or false.
- A predicted component is a *false positive* when it matches no true lesion and at most half of its voxels lie in
  true lesion voxels. A component mostly inside a true lesion but too small to match it (a fragment of a lesion
  predicted in pieces) is neither a hit nor a false lesion: it is counted as a ``fragment``.
- Lesion-wise Dice of a detected lesion: Dice of T and the union of the predicted components that match it.

Why IoU > 0.1 and not "the predicted component holds the true lesion's centre": the centre of an irregular or
crescent-shaped lesion (the phantom's solid lesions, cysts with septa) can lie outside the lesion, and a blob ten
times a lesion's size around its centre would count as a detection. IoU > 0.1 accepts partial coverage of small
lesions (half of a lesion predicted: IoU 0.5; a prediction twice the lesion's size around it: 0.5) and rejects a
blob more than ten times the lesion's size.

**Scores.** FROC and the lesion-presence AUC need a score per predicted component: ``predict`` records the largest
softmax lesion probability inside each component (``inference.lesion_candidates``). A true lesion's detection score
is the largest score among the components that match it; moving a threshold over the scores removes whole
components, so sensitivity and false positives per case at every threshold follow from these scores exactly. A
case's lesion-presence score is the largest score of its components (0 without any); the AUC is undefined (None)
when every case has a lesion, or none has.

**False-positive location** (item 2 of issue 17), relative to the *true* gland (label > 0): ``inside`` when at
least half of the component lies in it, ``border`` when less does but the component touches the gland (within one
voxel, 26-neighbourhood), ``outside`` otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

LESION_LABEL = 2
DEFAULT_IOU_THRESHOLD = 0.1
FRAGMENT_SHARE = 0.5  # a component with more than this share in true lesion voxels is never a false lesion
DEFAULT_SIZE_BINS_ML = (0.2, 1.0, 5.0)  # bin edges: < 0.2, 0.2-1, 1-5, >= 5 ml (PANDA-like clinical size classes)
DEFAULT_FP_SIZE_BINS_ML = (0.01, 0.05, 0.2)  # false lesions are mostly specks: finer bins
DEFAULT_MIN_VOLUME_ML = 0.1  # the headline sensitivity counts lesions of at least this volume (issue 17's bar)
DEFAULT_FP_BUDGETS = (0.1, 0.3, 1.0)  # false positives per case at which the FROC's sensitivity is reported
LOCATIONS = ("inside", "border", "outside")
TOUCHING = np.ones((3, 3, 3), bool)  # 26-connectivity


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a boolean 3D mask with 26-connectivity: (labels 0..n, n)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"need a 3D mask, got {mask.ndim}D")
    labels, n = ndimage.label(mask, TOUCHING)
    return labels, int(n)


@dataclass
class TrueLesion:
    index: int  # component number (1..n) in raster order of scipy's labelling
    voxels: int
    volume_ml: float
    centre: tuple[int, int, int]  # voxel centre of mass (z, y, x), rounded
    matched: tuple[int, ...]  # indices of the predicted components that match it
    best_iou: float  # largest IoU with any predicted component (0 when none overlaps)
    dice: float | None  # Dice with the union of its matched components; None when missed
    detection_score: float | None  # largest score of its matched components; None when missed or unscored

    @property
    def detected(self) -> bool:
        return bool(self.matched)


@dataclass
class PredictedLesion:
    index: int
    voxels: int
    volume_ml: float
    centre: tuple[int, int, int]
    matched: tuple[int, ...]  # indices of the true lesions it matches
    best_iou: float
    lesion_share: float  # share of its voxels in true lesion voxels
    score: float | None
    location: str  # inside / border / outside the true gland

    @property
    def false_positive(self) -> bool:
        return not self.matched and self.lesion_share <= FRAGMENT_SHARE

    @property
    def fragment(self) -> bool:
        return not self.matched and self.lesion_share > FRAGMENT_SHARE


@dataclass
class CaseLesions:
    case: str
    truth: list[TrueLesion] = field(default_factory=list)
    predicted: list[PredictedLesion] = field(default_factory=list)
    scored: bool = False  # every predicted component has a score

    @property
    def presence_score(self) -> float | None:
        """Largest component score (0 without a predicted lesion); None when the components are not scored."""
        if not self.scored:
            return None
        return max((p.score for p in self.predicted), default=0.0)


def _centres(labels: np.ndarray, n: int) -> list[tuple[int, int, int]]:
    if n == 0:
        return []
    centres = ndimage.center_of_mass(np.ones(labels.shape, np.uint8), labels, range(1, n + 1))
    return [tuple(int(round(c)) for c in centre) for centre in centres]


def _scores(pred_labels: np.ndarray, n_pred: int, score_points) -> list[float | None]:
    """Score of each predicted component from (voxel (z, y, x), score) points lying in it; the largest when several.

    Every point must lie in a component and every component must hold a point: otherwise the scores were recorded
    for another mask, and a ValueError says where.
    """
    if score_points is None:
        return [None] * n_pred
    scores: list[float | None] = [None] * n_pred
    for voxel, score in score_points:
        voxel = tuple(int(v) for v in voxel)
        if len(voxel) != pred_labels.ndim or not all(0 <= v < s for v, s in zip(voxel, pred_labels.shape)):
            raise ValueError(f"scored voxel {voxel} lies outside the mask of shape {pred_labels.shape}")
        component = int(pred_labels[voxel])
        if component == 0:
            raise ValueError(f"scored voxel {voxel} is not a predicted lesion voxel")
        previous = scores[component - 1]
        scores[component - 1] = float(score) if previous is None else max(previous, float(score))
    unscored = [i + 1 for i, s in enumerate(scores) if s is None]
    if unscored:
        raise ValueError(f"{len(unscored)} predicted lesion component(s) have no score "
                         f"(the first has {int((pred_labels == unscored[0]).sum())} voxels)")
    return scores


def _locations(pred_labels: np.ndarray, n_pred: int, gland: np.ndarray) -> list[str]:
    if n_pred == 0:
        return []
    voxels = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
    in_gland = np.bincount(pred_labels[gland], minlength=n_pred + 1)
    touching = np.zeros(n_pred + 1, bool)
    touching[np.unique(pred_labels[ndimage.binary_dilation(gland, TOUCHING)])] = True
    return ["inside" if in_gland[i] * 2 >= voxels[i] else "border" if touching[i] else "outside"
            for i in range(1, n_pred + 1)]


def match_case(pred_arr: np.ndarray, truth_arr: np.ndarray, spacing_zyx: Sequence[float], case: str = "",
               score_points: Sequence[tuple[Sequence[int], float]] | None = None,
               iou_threshold: float = DEFAULT_IOU_THRESHOLD, lesion_label: int = LESION_LABEL) -> CaseLesions:
    """Match the lesion components of one case (label maps on the same grid, (z, y, x)) by the module's rule.

    ``score_points``: (voxel, score) pairs, at least one voxel in each predicted component (``predict``'s
    candidates table records the voxel of each component's largest lesion probability).
    """
    pred_arr, truth_arr = np.asarray(pred_arr), np.asarray(truth_arr)
    if pred_arr.shape != truth_arr.shape:
        raise ValueError(f"label map shapes differ: {pred_arr.shape} vs {truth_arr.shape}")
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"IoU threshold must lie in [0, 1), got {iou_threshold}")
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    truth_labels, n_truth = label_components(truth_arr == lesion_label)
    pred_labels, n_pred = label_components(pred_arr == lesion_label)
    # overlap[t, p]: voxels in true component t and predicted component p (row / column 0: outside any)
    overlap = np.bincount(truth_labels.ravel().astype(np.int64) * (n_pred + 1) + pred_labels.ravel(),
                          minlength=(n_truth + 1) * (n_pred + 1)).reshape(n_truth + 1, n_pred + 1)
    truth_voxels, pred_voxels = overlap.sum(axis=1), overlap.sum(axis=0)
    inter = overlap[1:, 1:].astype(float)
    union = truth_voxels[1:, None] + pred_voxels[None, 1:] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    matches = iou > iou_threshold
    scores = _scores(pred_labels, n_pred, score_points)
    locations = _locations(pred_labels, n_pred, truth_arr > 0)

    result = CaseLesions(case, scored=score_points is not None)
    for t, centre in enumerate(_centres(truth_labels, n_truth)):
        matched = tuple(int(p) + 1 for p in np.flatnonzero(matches[t]))
        dice = detection = None
        if matched:
            columns = [p - 1 for p in matched]
            dice = 2.0 * inter[t, columns].sum() / (truth_voxels[t + 1] + pred_voxels[[p for p in matched]].sum())
            if result.scored:
                detection = max(scores[c] for c in columns)
        result.truth.append(TrueLesion(t + 1, int(truth_voxels[t + 1]), float(truth_voxels[t + 1] * voxel_ml), centre,
                                       matched, float(iou[t].max(initial=0.0)),
                                       None if dice is None else float(dice), detection))
    for p, centre in enumerate(_centres(pred_labels, n_pred)):
        in_lesions = int(pred_voxels[p + 1] - overlap[0, p + 1])
        result.predicted.append(PredictedLesion(
            p + 1, int(pred_voxels[p + 1]), float(pred_voxels[p + 1] * voxel_ml), centre,
            tuple(int(t) + 1 for t in np.flatnonzero(matches[:, p])), float(iou[:, p].max(initial=0.0)),
            float(in_lesions / pred_voxels[p + 1]), scores[p], locations[p]))
    return result


# ------------------------------------------------------------------------------------------------ summaries

def _bin_label(lower: float, upper: float) -> str:
    if lower == 0:
        return f"< {upper:g} ml"
    if np.isinf(upper):
        return f">= {lower:g} ml"
    return f"{lower:g}-{upper:g} ml"


def _bins(edges: Sequence[float]) -> list[tuple[float, float]]:
    edges = [float(e) for e in edges]
    if any(e <= 0 for e in edges) or edges != sorted(set(edges)):
        raise ValueError(f"size bin edges must be positive and increasing, got {edges}")
    bounds = [0.0, *edges, float("inf")]
    return list(zip(bounds[:-1], bounds[1:]))


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def sensitivity_by_size(truth: Sequence[TrueLesion], edges: Sequence[float] = DEFAULT_SIZE_BINS_ML) -> list[dict]:
    """Detected / total true lesions per volume bin [lower, upper), with the mean Dice of the detected ones."""
    rows = []
    for lower, upper in _bins(edges):
        members = [t for t in truth if lower <= t.volume_ml < upper]
        found = [t for t in members if t.detected]
        rows.append({"bin": _bin_label(lower, upper), "lower_ml": lower, "upper_ml": None if np.isinf(upper) else upper,
                     "total": len(members), "detected": len(found), "sensitivity": _ratio(len(found), len(members)),
                     "mean_dice_detected": float(np.mean([t.dice for t in found])) if found else None})
    return rows


def froc(cases: Sequence[CaseLesions], min_volume_ml: float = 0.0) -> dict | None:
    """Sensitivity against false positives per case as the score threshold moves (a component is kept when its
    score >= the threshold). None when the components carry no scores.

    Points run from the highest threshold to the lowest; the first point (threshold +inf: nothing kept) is (0, 0).
    Sensitivity counts true lesions of at least ``min_volume_ml``.
    """
    if not cases or not all(c.scored for c in cases):
        return None
    truth = [t for c in cases for t in c.truth if t.volume_ml >= min_volume_ml]
    detection = np.array([t.detection_score for t in truth if t.detection_score is not None], dtype=float)
    false = np.array([p.score for c in cases for p in c.predicted if p.false_positive], dtype=float)
    thresholds = np.unique(np.concatenate([detection, false]))[::-1]
    points = {"thresholds": [None], "sensitivity": [0.0 if truth else None], "fp_per_case": [0.0]}
    for threshold in thresholds:
        points["thresholds"].append(float(threshold))
        points["sensitivity"].append(_ratio(int((detection >= threshold).sum()), len(truth)))
        points["fp_per_case"].append(int((false >= threshold).sum()) / len(cases))
    points["min_volume_ml"] = float(min_volume_ml)
    points["n_true_lesions"] = len(truth)
    return points


def sensitivity_at_fp(curve: dict | None, budget: float) -> dict | None:
    """The FROC point with the highest sensitivity whose false positives per case stay within ``budget``."""
    if curve is None or curve["sensitivity"][0] is None:
        return None
    best = 0
    for i, fp in enumerate(curve["fp_per_case"]):
        if fp <= budget + 1e-12:
            best = i
    return {"fp_budget": budget, "threshold": curve["thresholds"][best], "sensitivity": curve["sensitivity"][best],
            "fp_per_case": curve["fp_per_case"][best]}


def presence_auc(cases: Sequence[CaseLesions]) -> float | None:
    """ROC AUC of "the case holds a lesion" from the case's presence score; None when undefined."""
    from sklearn.metrics import roc_auc_score

    if not cases or not all(c.scored for c in cases):
        return None
    positive = [bool(c.truth) for c in cases]
    if all(positive) or not any(positive):
        return None
    return float(roc_auc_score(positive, [c.presence_score for c in cases]))


def summarise(cases: Sequence[CaseLesions], size_bins_ml: Sequence[float] = DEFAULT_SIZE_BINS_ML,
              min_volume_ml: float = DEFAULT_MIN_VOLUME_ML, fp_size_bins_ml: Sequence[float] = DEFAULT_FP_SIZE_BINS_ML,
              fp_budgets: Sequence[float] = DEFAULT_FP_BUDGETS,
              iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> dict:
    """Every lesion-wise number of a set of cases, JSON-ready (undefined numbers are None)."""
    if not cases:
        raise ValueError("no cases to summarise")
    truth = [t for c in cases for t in c.truth]
    predicted = [p for c in cases for p in c.predicted]
    false = [p for p in predicted if p.false_positive]
    large = [t for t in truth if t.volume_ml >= min_volume_ml]
    detected = [t for t in truth if t.detected]
    dices = [t.dice for t in detected]
    fp_bins = []
    for lower, upper in _bins(fp_size_bins_ml):
        fp_bins.append({"bin": _bin_label(lower, upper), "lower_ml": lower,
                        "upper_ml": None if np.isinf(upper) else upper,
                        "count": sum(lower <= p.volume_ml < upper for p in false)})
    curve = froc(cases, min_volume_ml)
    return {
        "rule": {"connectivity": 26, "iou_threshold": iou_threshold, "fragment_share": FRAGMENT_SHARE,
                 "score": "largest softmax lesion probability in the predicted component",
                 "description": "true lesion detected when a predicted component has IoU > iou_threshold with it; "
                                "a predicted component matching no true lesion is a false positive unless more "
                                "than fragment_share of it lies in true lesion voxels"},
        "n_cases": len(cases),
        "n_true_lesions": len(truth),
        "n_detected": len(detected),
        "sensitivity": _ratio(len(detected), len(truth)),
        "sensitivity_min_volume": {"min_volume_ml": float(min_volume_ml), "total": len(large),
                                   "detected": sum(t.detected for t in large),
                                   "sensitivity": _ratio(sum(t.detected for t in large), len(large))},
        "by_size": sensitivity_by_size(truth, size_bins_ml),
        "n_predicted": len(predicted),
        "n_fragments": sum(p.fragment for p in predicted),
        "false_positives": {"total": len(false), "per_case": len(false) / len(cases),
                            "cases_with_any": sum(any(p.false_positive for p in c.predicted) for c in cases),
                            "by_size": fp_bins,
                            "by_location": {loc: sum(p.location == loc for p in false) for loc in LOCATIONS}},
        "lesion_dice_detected": {"n": len(dices), "mean": float(np.mean(dices)) if dices else None,
                                 "median": float(np.median(dices)) if dices else None},
        "presence_auc": presence_auc(cases),
        "froc": curve,
        "sensitivity_at_fp": [sensitivity_at_fp(curve, b) for b in fp_budgets] if curve is not None else None,
    }


def lesion_rows(cases: Sequence[CaseLesions]) -> list[dict]:
    """One row per true lesion and per predicted component, for the per-lesion CSV."""
    rows = []
    for c in cases:
        for t in c.truth:
            rows.append({"case": c.case, "kind": "true", "index": t.index, "voxels": t.voxels,
                         "volume_ml": t.volume_ml, "centre_z": t.centre[0], "centre_y": t.centre[1],
                         "centre_x": t.centre[2], "matched": " ".join(map(str, t.matched)), "best_iou": t.best_iou,
                         "status": "detected" if t.detected else "missed", "dice": t.dice,
                         "score": t.detection_score, "location": None})
        for p in c.predicted:
            status = "true_positive" if p.matched else "fragment" if p.fragment else "false_positive"
            rows.append({"case": c.case, "kind": "predicted", "index": p.index, "voxels": p.voxels,
                         "volume_ml": p.volume_ml, "centre_z": p.centre[0], "centre_y": p.centre[1],
                         "centre_x": p.centre[2], "matched": " ".join(map(str, p.matched)), "best_iou": p.best_iou,
                         "status": status, "dice": None, "score": p.score, "location": p.location})
    return rows


LESION_ROW_COLUMNS = ("case", "kind", "index", "voxels", "volume_ml", "centre_z", "centre_y", "centre_x", "matched",
                      "best_iou", "status", "dice", "score", "location")


def format_lesion_summary(summary: dict) -> list[str]:
    """Terminal lines: sensitivity by size, false positives per case, lesion-wise Dice, FROC operating points."""
    lines = []
    large = summary["sensitivity_min_volume"]
    fp = summary["false_positives"]
    rule = summary["rule"]
    lines.append(f"lesions (26-connected components, matched by IoU > {rule['iou_threshold']:g}): "
                 f"{summary['n_detected']}/{summary['n_true_lesions']} detected; "
                 f">= {large['min_volume_ml']:g} ml: {large['detected']}/{large['total']}"
                 + (f" = {large['sensitivity']:.3f}" if large["sensitivity"] is not None else ""))
    by_size = ", ".join(f"{b['bin']} {b['detected']}/{b['total']}" for b in summary["by_size"])
    lines.append(f"lesion sensitivity by size: {by_size}")
    where = ", ".join(f"{k} {v}" for k, v in fp["by_location"].items())
    lines.append(f"false-positive lesions: {fp['total']} ({fp['per_case']:.2f} per case; {where} the true gland)")
    dice = summary["lesion_dice_detected"]
    if dice["mean"] is not None:
        lines.append(f"lesion-wise Dice of detected lesions: mean {dice['mean']:.4f}, median {dice['median']:.4f}")
    if summary["sensitivity_at_fp"]:
        points = ", ".join(f"{p['sensitivity']:.3f} at <= {p['fp_budget']:g}" for p in summary["sensitivity_at_fp"]
                           if p is not None)
        lines.append(f"FROC (lesions >= {large['min_volume_ml']:g} ml): sensitivity {points} FP per case")
    auc = summary["presence_auc"]
    lines.append("lesion-presence AUC: " + (f"{auc:.4f}" if auc is not None else
                                            "n/a (needs cases with and without a lesion, and predict's scores)"))
    return lines
