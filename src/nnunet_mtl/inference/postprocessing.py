"""Keep the largest connected pancreas component, when the validation fold says it helps.

nnU-Net decides its connected-component postprocessing on the validation predictions; we do the same with the
task's own numbers (whole-pancreas Dice and lesion Dice) and store the decision as JSON in the model folder, where
the predictor finds it. The pancreas is one organ and the lesion lies in it, so a foreground blob away from the
largest one is a false positive (a vessel or bowel loop); the predictor's subtype already looks at the lesion inside
that component when there is one (``predictor.lesion_centre``). The connected-component work itself is nnU-Net's
function.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation

from nnunet_mtl.data.nifti import read_volume
from nnunet_mtl.evaluation.metrics import dice
from nnunet_mtl.tempfiles import temp_path

POSTPROCESSING_FILE = "postprocessing.json"
LESION_LABEL = 2


def keep_largest_component(segmentation: np.ndarray) -> np.ndarray:
    """All foreground labels outside the largest foreground component become background."""
    labels = tuple(int(v) for v in np.unique(segmentation) if v != 0)
    if not labels:
        return segmentation
    return remove_all_but_largest_component_from_segmentation(segmentation, [labels])


def _task_score(prediction: np.ndarray, truth: np.ndarray) -> float:
    return (dice(prediction > 0, truth > 0) + dice(prediction == LESION_LABEL, truth == LESION_LABEL)) / 2


def task_scores(prediction_dir: Path, truth_dir: Path, cases: list[str]) -> dict[str, tuple[float, float]]:
    """Per case, the task score (mean of whole-pancreas and lesion Dice) without and with the largest component."""
    scores = {}
    for case in cases:
        prediction = read_volume(prediction_dir / f"{case}.nii.gz", "mask").array
        truth = read_volume(truth_dir / f"{case}.nii.gz", "mask").array
        scores[case] = (_task_score(prediction, truth), _task_score(keep_largest_component(prediction), truth))
    return scores


def decide(scores: dict[str, tuple[float, float]]) -> dict:
    """Keep the largest component when it raises the mean task score over these cases (one fold's, or every
    cross-validation fold's pooled)."""
    score_without = float(np.mean([s[0] for s in scores.values()])) if scores else 0.0
    score_with = float(np.mean([s[1] for s in scores.values()])) if scores else 0.0
    return {"keep_largest_component": score_with > score_without, "criterion": "mean of whole-pancreas and lesion "
            "Dice over the validation cases", "score_without": score_without, "score_with": score_with,
            "cases": len(scores)}


def determine(prediction_dir: Path, truth_dir: Path, cases: list[str]) -> dict:
    """The decision on one folder of validation predictions."""
    return decide(task_scores(prediction_dir, truth_dir, cases))


def apply_to_folder(prediction_dir: Path, cases: list[str]) -> None:
    for case in cases:
        path = prediction_dir / f"{case}.nii.gz"
        mask = read_volume(path, "mask")
        kept = mask.geometry.apply_to(sitk.GetImageFromArray(keep_largest_component(mask.array).astype(np.uint8)))
        tmp = temp_path(path, ".nii.gz")
        try:
            sitk.WriteImage(kept, str(tmp), True)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)


def write_decision(model_dir: Path, decision: dict) -> None:
    tmp = temp_path(model_dir / POSTPROCESSING_FILE)
    try:
        tmp.write_text(json.dumps(decision, indent=2))
        tmp.replace(model_dir / POSTPROCESSING_FILE)
    finally:
        tmp.unlink(missing_ok=True)


def read_decision(model_dir: Path) -> bool:
    """Whether the model folder's validation chose the largest-component step (False when never decided)."""
    path = model_dir / POSTPROCESSING_FILE
    return bool(json.loads(path.read_text())["keep_largest_component"]) if path.is_file() else False
