"""False-lesion filters: chosen on the validation fold, stored in the model folder, applied by ``predict``.

Three filters, each removing whole predicted lesion components (``lesion_candidates.Candidate``):

- ``min_volume_ml``: components smaller than this;
- ``min_probability``: components whose largest softmax lesion probability is below this;
- ``drop_outside_gland``: components outside the largest foreground component (the gland). With nnU-Net-style
  largest-component postprocessing on, nothing lies outside it any more; this filter removes outside lesions only
  and keeps the rest of the foreground.

A removed component's voxels become pancreas (label 1) when it lies in the gland, background otherwise: a false
lesion inside the gland is gland tissue taken for lesion, and whole-pancreas Dice should not pay for removing it.

**Choice on the validation fold** (``choose``, called by the trainer's final validation beside nnU-Net's
largest-component decision): every setting of a small grid is scored on the validation cases by the lesion-wise
rule of :mod:`nnunet_mtl.evaluation.lesions`. Admissible settings detect every true lesion that the unfiltered
prediction detects, *with a margin*: each detected lesion must keep a matching component at least
``VOLUME_MARGIN`` times the minimum volume and ``PROBABILITY_MARGIN`` above the minimum probability (half the
distance to 1 where that is less, so that the strict end of the grid can be chosen: at 0.98 a found lesion must
score 0.99, at 0.999 it must score 0.9995, about the same margin in log-odds), because a validation fold of a dozen
cases cannot show the smallest or faintest lesion of a test set. Among admissible settings the one with the fewest
false lesions wins; ties go to the gentler setting. A fold whose unfiltered prediction finds fewer than
``MIN_FOUND_LESIONS`` true lesions shows nothing about what a true lesion looks like, so it gets no filters. The
decision, with the counts of every setting, is stored under ``lesion_filters`` in the model folder's
``postprocessing.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nnunet_mtl.evaluation.lesions import CaseLesions, label_components
from nnunet_mtl.inference.lesion_candidates import LESION_LABEL, Candidate, find_candidates
from nnunet_mtl.inference.postprocessing import POSTPROCESSING_FILE

PANCREAS_LABEL = 1
DECISION_KEY = "lesion_filters"
VOLUME_GRID_ML = (0.0, 0.005, 0.01, 0.02, 0.05)
# The strict end follows networks whose softmax saturates with longer training: at 80 epochs instead of 32 the
# false lesions of the bench's phantom score 0.98-0.999 (docs/measurements-lesions.md), out of reach of 0.98.
PROBABILITY_GRID = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
VOLUME_MARGIN = 2.0  # a kept true lesion's component must be at least twice the minimum volume
PROBABILITY_MARGIN = 0.05  # ... and its score this much above the minimum probability (at most half of 1 - it)
MIN_FOUND_LESIONS = 3  # fewer found validation lesions: no evidence to filter by


@dataclass(frozen=True)
class LesionFilters:
    min_volume_ml: float = 0.0
    min_probability: float = 0.0
    drop_outside_gland: bool = False

    @property
    def active(self) -> bool:
        return self.min_volume_ml > 0 or self.min_probability > 0 or self.drop_outside_gland

    def keeps(self, candidate: Candidate, volume_margin: float = 1.0, probability_margin: float = 0.0) -> bool:
        margin = min(probability_margin, (1.0 - self.min_probability) / 2) if self.min_probability else 0.0
        return (candidate.volume_ml >= self.min_volume_ml * volume_margin
                and candidate.max_probability >= self.min_probability + margin
                and (candidate.in_gland or not self.drop_outside_gland))

    def describe(self) -> str:
        if not self.active:
            return "none"
        parts = []
        if self.min_volume_ml:
            parts.append(f"lesion components >= {self.min_volume_ml:g} ml")
        if self.min_probability:
            parts.append(f"lesion probability >= {self.min_probability:g}")
        if self.drop_outside_gland:
            parts.append("lesions outside the gland removed")
        return ", ".join(parts)


NO_FILTERS = LesionFilters()


def postprocess(segmentation: np.ndarray, probabilities: np.ndarray, spacing_zyx: Sequence[float],
                filters: LesionFilters = NO_FILTERS) -> tuple[np.ndarray, list[Candidate]]:
    """Score the lesion components of a mask (class probabilities in channel order, channel 2 = lesion), remove
    what ``filters`` removes: (final mask, its candidates). Without a lesion channel there is nothing to score."""
    if probabilities.shape[0] <= LESION_LABEL:
        return segmentation, []
    labels, candidates = find_candidates(segmentation, probabilities[LESION_LABEL], spacing_zyx)
    return apply(segmentation, labels, candidates, filters)


def apply(segmentation: np.ndarray, labels: np.ndarray, candidates: Sequence[Candidate],
          filters: LesionFilters) -> tuple[np.ndarray, list[Candidate]]:
    """(filtered mask, kept candidates renumbered 1..k in the same raster order); the input mask is not changed."""
    removed = [c for c in candidates if not filters.keeps(c)]
    if not removed:
        return segmentation, list(candidates)
    segmentation = segmentation.copy()
    for c in removed:
        segmentation[labels == c.component] = PANCREAS_LABEL if c.in_gland else 0
    kept = [c for c in candidates if filters.keeps(c)]
    return segmentation, [Candidate(i, c.voxels, c.volume_ml, c.peak, c.max_probability, c.mean_probability,
                                    c.in_gland) for i, c in enumerate(kept, start=1)]


def apply_to_folder(prediction_dir: Path, candidates: Mapping[str, Sequence[Candidate]],
                    filters: LesionFilters) -> dict[str, list[Candidate]]:
    """Apply ``filters`` to the written masks ``<case>.nii.gz`` (rewritten atomically where something is removed);
    ``candidates`` describe those masks. Returns the kept candidates per case."""
    import SimpleITK as sitk

    kept = {}
    for case, case_candidates in candidates.items():
        if all(filters.keeps(c) for c in case_candidates):
            kept[case] = list(case_candidates)
            continue
        path = Path(prediction_dir) / f"{case}.nii.gz"
        image = sitk.ReadImage(str(path))
        segmentation = sitk.GetArrayFromImage(image)
        labels, _ = label_components(segmentation == LESION_LABEL)
        segmentation, kept[case] = apply(segmentation, labels, case_candidates, filters)
        filtered = sitk.GetImageFromArray(segmentation.astype(np.uint8))
        filtered.CopyInformation(image)
        tmp = path.with_name(f".{path.name}.tmp.nii.gz")
        sitk.WriteImage(filtered, str(tmp), True)
        tmp.replace(path)
    return kept


def _paired(case: CaseLesions, candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates in the order of ``case.predicted``: both label the same mask in the same raster order."""
    by_index = {c.component: c for c in candidates}
    paired = []
    for p in case.predicted:
        c = by_index.get(p.index)
        if c is None or c.voxels != p.voxels:
            raise ValueError(f"{case.case}: lesion candidates do not describe the evaluated mask")
        paired.append(c)
    return paired


def outcome(cases: Sequence[tuple[CaseLesions, Sequence[Candidate]]], filters: LesionFilters,
            volume_margin: float = 1.0, probability_margin: float = 0.0) -> dict:
    """Detected true lesions, false lesions and mean case lesion Dice after removing what ``filters`` removes."""
    detected = false = 0
    lost: list[float] = []
    dices = []
    for case, candidates in cases:
        paired = _paired(case, candidates)
        kept = {p.index for p, c in zip(case.predicted, paired) if filters.keeps(c, volume_margin, probability_margin)}
        for t in case.truth:
            if any(m in kept for m in t.matched):
                detected += 1
            elif t.detected:
                lost.append(t.volume_ml)
        false += sum(p.false_positive for p in case.predicted if p.index in kept)
        truth_voxels = sum(t.voxels for t in case.truth)
        pred_voxels = sum(p.voxels for p in case.predicted if p.index in kept)
        overlap = sum(p.lesion_share * p.voxels for p in case.predicted if p.index in kept)
        dices.append(1.0 if truth_voxels + pred_voxels == 0 else 2 * overlap / (truth_voxels + pred_voxels))
    return {"filters": asdict(filters), "detected": detected, "false_positives": false,
            "fp_per_case": false / max(len(cases), 1), "lost_lesions_ml": sorted(lost),
            "mean_case_lesion_dice": float(np.mean(dices)) if dices else None}


def choose(cases: Sequence[tuple[CaseLesions, Sequence[Candidate]]], allow_outside_gland: bool = True) -> dict:
    """The decision stored in postprocessing.json (see the module docstring for the rule)."""
    grid = [LesionFilters(v, p, o) for o in ((False, True) if allow_outside_gland else (False,))
            for v in VOLUME_GRID_ML for p in PROBABILITY_GRID]
    baseline = outcome(cases, NO_FILTERS)
    rows = []
    for filters in grid:
        row = outcome(cases, filters)
        safe = outcome(cases, filters, VOLUME_MARGIN, PROBABILITY_MARGIN)
        row["admissible"] = safe["detected"] == baseline["detected"]
        rows.append(row)
    admissible = [(r, f) for r, f in zip(rows, grid) if r["admissible"]]
    # fewest false lesions; then the gentlest setting (grid order: smaller thresholds first, outside kept first)
    best_row, best = min(admissible, key=lambda rf: (rf[0]["false_positives"], grid.index(rf[1])))
    if baseline["detected"] < MIN_FOUND_LESIONS:
        best_row, best = baseline, NO_FILTERS
    return {**asdict(best), "description": best.describe(),
            "criterion": "fewest false lesions on the validation fold among settings that keep every detected true "
                         f"lesion with a margin (component >= {VOLUME_MARGIN:g} x the minimum volume, score >= "
                         f"the minimum probability + {PROBABILITY_MARGIN:g}, or + half its distance to 1 where "
                         f"less); no filters when fewer than {MIN_FOUND_LESIONS} true lesions are found",
            "validation": {"cases": len(cases), "true_lesions": sum(len(c.truth) for c, _ in cases),
                           "without_filters": baseline, "chosen": best_row},
            "grid": rows}


def write_decision(model_dir: Path, decision: dict) -> None:
    """Add (or replace) the lesion filters in the model folder's postprocessing.json, atomically."""
    path = Path(model_dir) / POSTPROCESSING_FILE
    content = json.loads(path.read_text()) if path.is_file() else {}
    content[DECISION_KEY] = decision
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=2))
    tmp.replace(path)


def read_lesion_filters(model_dir: Path) -> LesionFilters:
    """The filters the model's validation chose; none when it never decided (a model trained before issue 17)."""
    path = Path(model_dir) / POSTPROCESSING_FILE
    if not path.is_file():
        return NO_FILTERS
    decision = json.loads(path.read_text()).get(DECISION_KEY)
    if not decision:
        return NO_FILTERS
    return LesionFilters(float(decision["min_volume_ml"]), float(decision["min_probability"]),
                         bool(decision["drop_outside_gland"]))
