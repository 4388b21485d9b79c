"""Postprocessing decided on every cross-validation fold's held-out cases together, not on the last fold alone.

nnU-Net decides its connected-component postprocessing on the merged predictions of all folds. Each fold's final
validation here decides on its own dozen cases and writes the model folder's ``postprocessing.json``; with several
folds the last fold's decision would stand, resting on a fifth of the held-out cases. So each fold's validation also
stores the evidence behind its decision (``validation/decision_evidence.json``: per case the task score without and
with the largest component, and the matched lesion components with their scores under both), and after the last fold
:func:`decide_from_folds` takes both decisions again on the pooled cases, by the same rules
(:func:`nnunet_mtl.inference.postprocessing.decide`, :func:`nnunet_mtl.inference.lesion_filters.choose`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from nnunet_mtl.evaluation.lesions import CaseLesions, PredictedLesion, TrueLesion
from nnunet_mtl.inference import lesion_filters, postprocessing
from nnunet_mtl.inference.lesion_candidates import Candidate
from nnunet_mtl.tempfiles import temp_path

EVIDENCE_FILE = "decision_evidence.json"
Evidence = dict[bool, tuple[CaseLesions, list[Candidate]]]  # keyed by "largest component kept"


def save_evidence(validation_dir: Path, scores: Mapping[str, tuple[float, float]],
                  evidence: Mapping[str, Evidence]) -> None:
    """Write one fold's decision evidence beside its validation predictions (atomically)."""
    cases = {}
    for case, (without, with_largest) in scores.items():
        lesions = {str(largest).lower(): {"lesions": asdict(found), "candidates": [asdict(c) for c in candidates]}
                   for largest, (found, candidates) in evidence.get(case, {}).items()}
        cases[case] = {"task_score": [without, with_largest], "lesions": lesions}
    path = Path(validation_dir) / EVIDENCE_FILE
    tmp = temp_path(path)
    try:
        tmp.write_text(json.dumps({"cases": cases}))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _case_lesions(data: dict) -> CaseLesions:
    def lesion(kind, d):
        return kind(**{**d, "centre": tuple(d["centre"]), "matched": tuple(d["matched"])})

    return CaseLesions(data["case"], [lesion(TrueLesion, t) for t in data["truth"]],
                       [lesion(PredictedLesion, p) for p in data["predicted"]], data["scored"])


def load_evidence(validation_dir: Path) -> tuple[dict[str, tuple[float, float]], dict[str, Evidence]]:
    """One fold's stored evidence: task scores per case, and lesion evidence per case (empty without a lesion
    channel)."""
    content = json.loads((Path(validation_dir) / EVIDENCE_FILE).read_text())["cases"]
    scores, evidence = {}, {}
    for case, entry in content.items():
        scores[case] = (float(entry["task_score"][0]), float(entry["task_score"][1]))
        evidence[case] = {key == "true": (_case_lesions(v["lesions"]),
                                          [Candidate(**{**c, "peak": tuple(c["peak"])}) for c in v["candidates"]])
                          for key, v in entry["lesions"].items()}
    return scores, evidence


def decide_from_folds(model_dir: Path, folds: Sequence[str]) -> dict | None:
    """Decide the largest-component step and the lesion filters on all ``folds``' validation cases together and
    write them to the model folder; None (nothing written) when a fold has no stored evidence."""
    scores: dict[str, tuple[float, float]] = {}
    evidence: dict[str, Evidence] = {}
    for fold in folds:
        folder = Path(model_dir) / f"fold_{fold}" / "validation"
        if not (folder / EVIDENCE_FILE).is_file():
            return None
        fold_scores, fold_evidence = load_evidence(folder)
        scores.update(fold_scores)
        evidence.update(fold_evidence)
    decision = {**postprocessing.decide(scores), "folds": [str(f) for f in folds]}
    postprocessing.write_decision(Path(model_dir), decision)
    largest = decision["keep_largest_component"]
    filters = None
    if scores and all(evidence.get(case) for case in scores):
        filters = lesion_filters.choose([evidence[case][largest] for case in scores],
                                         allow_outside_gland=not largest)
        filters["folds"] = decision["folds"]
        lesion_filters.write_decision(Path(model_dir), filters)
    return {"postprocessing": decision, "lesion_filters": filters}
