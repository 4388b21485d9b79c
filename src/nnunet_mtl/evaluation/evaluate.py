"""Evaluate a prediction folder against ground truth and write ``metrics.json`` and ``metrics_per_case.csv``.

The prediction folder holds one mask per case (``<case>.nii.gz``, labels 0 / 1 / 2), ``subtype_results.csv``
(header exactly ``Names,Subtype``) and optionally ``subtype_probabilities.csv`` (``Names,Subtype,prob_0,...``) and
``lesion_candidates.csv`` (predict's score per lesion component, for the FROC curve and the lesion-presence AUC).
Lesion-wise numbers (:mod:`nnunet_mtl.evaluation.lesions`) go into metrics.json under ``lesions`` and, one row per
true lesion and predicted component, into ``metrics_per_lesion.csv``.

Truth is one of:

(a) an nnU-Net raw dataset folder (``dataset.json``, ``labelsTr/``, ``imagesTr/``, ``splits_final.json``): the cases
    are the ``val`` list of ``fold`` (the validation fold), subtypes come from dataset.json's ``case_subtypes`` and
    class names from its ``subtype_names``; images default to ``imagesTr``;
(b) a folder of masks ``<case>.nii.gz`` with subtypes from ``subtypes_csv`` or a ``subtype_results.csv`` inside it
    (the phantom's ``test_groundtruth`` layout). Without any subtypes, classification is skipped with a note.

A case id is the file name without ``.nii.gz``; names in CSVs and image files may carry the ``_0000`` channel suffix.
Inputs are checked before any metric is computed, and every problem names its cases: prediction and truth must hold
exactly the same cases, every mask must share size, spacing, origin and direction with its truth (and image), and
mask values must be 0, 1 or 2 (floats within 1e-3 of those are rounded, as real masks store 1.0000152587890625).
Metric definitions and empty-mask conventions: :mod:`nnunet_mtl.evaluation.metrics`.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_mtl.data.nifti import Geometry, NiftiError, Volume, read_geometry, read_volume
from nnunet_mtl.evaluation import lesions as lesion_metrics
from nnunet_mtl.evaluation.metrics import (
    DEFAULT_TOLERANCE_MM,
    EMPTY_CASE_CONVENTIONS,
    METRIC_LABELS,
    SEGMENTATION_METRICS,
    classification_metrics,
    segmentation_metrics,
)
from nnunet_mtl.inference.outputs import write_csv_atomic
from nnunet_mtl.paths import make_dirs
from nnunet_mtl.tempfiles import temp_path

SUBTYPES_CSV = "subtype_results.csv"
PROBABILITIES_CSV = "subtype_probabilities.csv"
METRICS_JSON = "metrics.json"
PER_CASE_CSV = "metrics_per_case.csv"
PER_LESION_CSV = "metrics_per_lesion.csv"
LESION_COUNT_COLUMNS = ("true_lesions", "detected_lesions", "false_positive_lesions")
SUBTYPE_HEADER = ["Names", "Subtype"]
NIFTI = ".nii.gz"
CHANNEL_SUFFIX = "_0000"
SCHEMA_VERSION = 1
# The task's validation targets (SPEC section 1); the report shows whether a run meets them.
TARGETS = (("dice_pancreas", "whole-pancreas Dice (mean)", 0.91),
           ("dice_lesion", "lesion Dice (mean)", 0.31),
           ("macro_f1", "subtype macro-F1", 0.70))
LABEL_TOLERANCE = 1e-3
SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4
VOLUME_COLUMNS = ("truth_pancreas_ml", "pred_pancreas_ml", "truth_lesion_ml", "pred_lesion_ml")


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated as given; the message names the files or cases at fault."""


@dataclass(frozen=True)
class Truth:
    """Ground truth resolved from either layout, restricted to the evaluated cases."""

    mode: str  # "nnunet_raw" or "mask_folder"
    cases: list[str]
    masks: dict[str, Path]
    subtypes: dict[str, int] | None
    subtypes_source: Path | None
    class_names: list[str] | None
    images_dir: Path | None
    fold: int | None


def _names(items: Iterable[str], limit: int = 12) -> str:
    items = sorted(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def list_masks(folder: Path) -> dict[str, Path]:
    """Masks by case id; an image lying next to its mask (``X_0000.nii.gz`` beside ``X.nii.gz``) is skipped, and
    so are hidden files (a temporary ``.X.tmp...nii.gz`` a killed run left is not a case)."""
    files = {p.name[:-len(NIFTI)]: p for p in sorted(Path(folder).glob(f"*{NIFTI}")) if not p.name.startswith(".")}
    return {c: p for c, p in files.items()
            if not (c.endswith(CHANNEL_SUFFIX) and c[:-len(CHANNEL_SUFFIX)] in files)}


def _csv_case(name: str, known: set[str]) -> str:
    case = name[:-len(NIFTI)] if name.endswith(NIFTI) else name
    if case not in known and case.endswith(CHANNEL_SUFFIX) and case[:-len(CHANNEL_SUFFIX)] in known:
        return case[:-len(CHANNEL_SUFFIX)]
    return case


def _read_rows(path: Path, expected_header: list[str] | None) -> tuple[list[str], list[list[str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise EvaluationError(f"{path} cannot be read as CSV ({e})") from None
    if not rows:
        raise EvaluationError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]
    if expected_header is not None and header != expected_header:
        raise EvaluationError(f"{path}: header is {','.join(rows[0])!r}, expected exactly "
                              f"{','.join(expected_header)!r}")
    return header, rows[1:]


def read_subtypes_csv(path: Path, known: set[str]) -> dict[str, int]:
    """Subtype per case from a ``Names,Subtype`` file; duplicate cases and non-integer subtypes are errors."""
    _, rows = _read_rows(path, SUBTYPE_HEADER)
    subtypes: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        if len(row) != 2:
            raise EvaluationError(f"{path} line {line}: expected 2 fields, got {row}")
        case = _csv_case(row[0].strip(), known)
        if case in subtypes:
            raise EvaluationError(f"{path} line {line}: case {case} listed twice")
        try:
            subtypes[case] = int(row[1].strip())
        except ValueError:
            raise EvaluationError(f"{path} line {line}: subtype {row[1]!r} of {case} is not an integer") from None
    return subtypes


def read_probabilities_csv(path: Path, known: set[str]) -> dict[str, list[float]]:
    """Class probabilities per case from ``Names,Subtype,prob_0,...,prob_{K-1}`` (later columns, such as
    predict's lesion columns, are not probabilities and are ignored here)."""
    header, rows = _read_rows(path, None)
    n_classes = sum(1 for _ in itertools.takewhile(lambda h: h.startswith("prob_"), header[2:]))
    expected = SUBTYPE_HEADER + [f"prob_{k}" for k in range(n_classes)]
    if n_classes < 2 or header[:2 + n_classes] != expected:
        raise EvaluationError(f"{path}: header is {','.join(header)!r}, expected Names,Subtype,prob_0,...,prob_K-1")
    probabilities: dict[str, list[float]] = {}
    for line, row in enumerate(rows, start=2):
        case = _csv_case(row[0].strip(), known) if row else ""
        if len(row) != len(header) or case in probabilities:
            raise EvaluationError(f"{path} line {line}: malformed or repeated row {row}")
        try:
            values = [float(v) for v in row[2:2 + n_classes]]
        except ValueError:
            raise EvaluationError(f"{path} line {line}: non-numeric probability in {row}") from None
        if not all(np.isfinite(values)):
            raise EvaluationError(f"{path} line {line}: non-finite probability in {row}")
        probabilities[case] = values
    return probabilities


def _check_same_cases(what: str, found: Iterable[str], expected: Iterable[str], where: Path) -> None:
    found, expected = set(found), set(expected)
    missing, extra = expected - found, found - expected
    problems = []
    if missing:
        problems.append(f"{len(missing)} case(s) missing: {_names(missing)}")
    if extra:
        problems.append(f"{len(extra)} case(s) not in the truth: {_names(extra)}")
    if problems:
        raise EvaluationError(f"{what} in {where} do not match the {len(expected)} truth cases; "
                              + "; ".join(problems))


def load_truth(truth: str | Path, subtypes_csv: str | Path | None = None, fold: int = 0) -> Truth:
    """Resolve the truth layout (nnU-Net raw dataset or mask folder) into the evaluated cases and their subtypes."""
    truth = Path(truth)
    if not truth.is_dir():
        raise EvaluationError(f"truth folder {truth} does not exist")
    if (truth / "dataset.json").is_file():
        dataset = json.loads((truth / "dataset.json").read_text())
        masks = list_masks(truth / "labelsTr")
        splits_path = truth / "splits_final.json"
        if not splits_path.is_file():
            raise EvaluationError(f"{truth} is an nnU-Net dataset without splits_final.json, so its validation fold "
                                  "is unknown; add the file or pass a folder of masks with --subtypes")
        splits = json.loads(splits_path.read_text())
        if not 0 <= fold < len(splits):
            raise EvaluationError(f"fold {fold} does not exist in {splits_path} ({len(splits)} folds)")
        cases = sorted(splits[fold]["val"])
        missing = set(cases) - set(masks)
        if missing:
            raise EvaluationError(f"{truth / 'labelsTr'} lacks masks of validation cases: {_names(missing)}")
        if subtypes_csv is not None:
            subtypes, source = read_subtypes_csv(Path(subtypes_csv), set(cases)), Path(subtypes_csv)
        elif "case_subtypes" in dataset:
            subtypes = {c: int(s) for c, s in dataset["case_subtypes"].items()}
            source = truth / "dataset.json"
        else:
            subtypes, source = None, None
        if subtypes is not None:
            absent = set(cases) - set(subtypes)
            if absent:
                raise EvaluationError(f"{source} has no subtype for validation cases: {_names(absent)}")
            subtypes = {c: subtypes[c] for c in cases}
        names = dataset.get("subtype_names")
        class_names = [names[k] for k in sorted(names, key=int)] if names else None
        return Truth("nnunet_raw", cases, {c: masks[c] for c in cases}, subtypes, source, class_names,
                     truth / "imagesTr", fold)

    masks = list_masks(truth)
    if not masks:
        raise EvaluationError(f"{truth} holds neither dataset.json nor any {NIFTI} mask")
    cases = sorted(masks)
    source = Path(subtypes_csv) if subtypes_csv is not None else truth / SUBTYPES_CSV
    if subtypes_csv is None and not source.is_file():
        return Truth("mask_folder", cases, masks, None, None, None, None, None)
    if not source.is_file():
        raise EvaluationError(f"subtype file {source} does not exist")
    subtypes = read_subtypes_csv(source, set(cases))
    _check_same_cases("subtypes", subtypes, cases, source)
    return Truth("mask_folder", cases, masks, subtypes, source, None, None, None)


def _geometry_problems(reference: Geometry, other: Geometry, what: str) -> list[str]:
    size_a, spacing_a, origin_a, direction_a = reference.size, reference.spacing, reference.origin, reference.direction
    size_b, spacing_b, origin_b, direction_b = other.size, other.spacing, other.origin, other.direction
    problems = []
    if size_a != size_b:
        problems.append(f"{what} size {list(size_b)} vs truth {list(size_a)}")
    elif not np.allclose(spacing_a, spacing_b, rtol=SPACING_RTOL, atol=0):
        problems.append(f"{what} spacing {np.round(spacing_b, 5).tolist()} vs truth {np.round(spacing_a, 5).tolist()}")
    elif not np.allclose(origin_a, origin_b, rtol=0, atol=ORIGIN_ATOL_MM):
        problems.append(f"{what} origin {np.round(origin_b, 3).tolist()} vs truth {np.round(origin_a, 3).tolist()}")
    elif not np.allclose(direction_a, direction_b, rtol=0, atol=DIRECTION_ATOL):
        problems.append(f"{what} direction differs from the truth's")
    return problems


def image_path(images_dir: Path, case: str) -> Path:
    return Path(images_dir) / f"{case}{CHANNEL_SUFFIX}{NIFTI}"


def read_label_map(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(uint8 label array in z, y, x order, spacing in z, y, x); values other than ~0/1/2 raise EvaluationError."""
    volume = read_mask(path)
    return label_array(volume), volume.spacing_zyx


def read_mask(path: Path) -> Volume:
    """A mask through the verified reader: a damaged file is an EvaluationError naming it."""
    try:
        return read_volume(path, "mask")
    except NiftiError as e:
        raise EvaluationError(str(e)) from None


def label_array(volume: Volume) -> np.ndarray:
    """The mask's labels as uint8; values other than ~0/1/2 raise EvaluationError naming the file."""
    array = volume.array
    rounded = np.rint(array) if np.issubdtype(array.dtype, np.floating) else array
    off = np.abs(array - rounded) > LABEL_TOLERANCE
    if off.any():
        raise EvaluationError(f"{volume.path}: non-integer labels, e.g. {float(array[off][0])}")
    bad = np.setdiff1d(np.unique(rounded), [0, 1, 2])
    if bad.size:
        raise EvaluationError(f"{volume.path}: labels {bad.tolist()[:5]} outside 0 (background), 1 (pancreas), "
                              "2 (lesion)")
    return rounded.astype(np.uint8)


def _summary_stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std()),
            "min": float(a.min()), "max": float(a.max())}


def _targets(segmentation: dict, classification: dict | None) -> list[dict]:
    values = {k: v["mean"] for k, v in segmentation.items()}
    if classification is not None:
        values["macro_f1"] = classification["macro"]["f1"]
    return [{"metric": key, "label": label, "threshold": threshold, "value": values.get(key),
             "met": None if values.get(key) is None else bool(values[key] >= threshold)}
            for key, label, threshold in TARGETS]


def _write_per_case_csv(path: Path, rows: list[dict], n_probabilities: int) -> None:
    columns = (["case", *SEGMENTATION_METRICS, *VOLUME_COLUMNS, *LESION_COUNT_COLUMNS, "subtype_true", "subtype_pred",
                "correct"]
               + [f"prob_{k}" for k in range(n_probabilities)])
    table = [columns]
    for row in rows:
        probabilities = row.get("probabilities") or []
        values = [row.get(c) for c in columns[:len(columns) - n_probabilities]] + probabilities
        table.append(["" if v is None else v for v in values])
    write_csv_atomic(path, table)


def _image_geometry(path: Path) -> Geometry:
    """An image only gives the reference grid here: its header is read (checked), its voxels are not."""
    try:
        return read_geometry(path, "image")
    except NiftiError as e:
        raise EvaluationError(str(e)) from None


def _check_subtype_range(truth: dict[str, int], truth_source: Path | None, predicted: dict[str, int],
                         predicted_source: Path, n_classes: int | None) -> None:
    """Subtypes outside 0..K-1 (K from the class names or the probability columns; negative ones always), named
    with their case and file."""
    bad = []
    for values, source in ((truth, truth_source), (predicted, predicted_source)):
        for case, value in sorted(values.items()):
            if value < 0 or (n_classes is not None and value >= n_classes):
                bad.append(f"{case} = {value} in {source}")
    if bad:
        expected = f"0..{n_classes - 1}" if n_classes is not None else "0 or more"
        raise EvaluationError(f"subtypes outside {expected}: {'; '.join(bad[:12])}"
                              + (f" and {len(bad) - 12} more" if len(bad) > 12 else ""))


def _read_lesion_scores(pred_dir: Path, known: set[str]) -> dict[str, list] | None:
    """(peak voxel, score) points per case from predict's lesion_candidates.csv; None when the table is absent."""
    from nnunet_mtl.inference.lesion_candidates import CANDIDATES_CSV, read_candidates_table

    path = pred_dir / CANDIDATES_CSV
    if not path.is_file():
        return None
    try:
        table = read_candidates_table(path)
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    unknown = {_csv_case(c, known) for c in table} - known
    if unknown:
        raise EvaluationError(f"{path} lists cases that are not in the truth: {_names(unknown)}")
    return {_csv_case(c, known): [(k.peak, k.score) for k in rows] for c, rows in table.items()}


def _write_lesion_csv(path: Path, cases: list[lesion_metrics.CaseLesions]) -> None:
    columns = lesion_metrics.LESION_ROW_COLUMNS
    write_csv_atomic(path, [columns] + [["" if row[c] is None else row[c] for c in columns]
                                        for row in lesion_metrics.lesion_rows(cases)])


def evaluate_folder(pred_dir: str | Path, truth: str | Path, subtypes_csv: str | Path | None = None, fold: int = 0,
                    images_dir: str | Path | None = None, tolerance_mm: float = DEFAULT_TOLERANCE_MM,
                    out_dir: str | Path | None = None,
                    lesion_size_bins_ml: tuple[float, ...] = lesion_metrics.DEFAULT_SIZE_BINS_ML,
                    lesion_iou_threshold: float = lesion_metrics.DEFAULT_IOU_THRESHOLD,
                    lesion_min_volume_ml: float = lesion_metrics.DEFAULT_MIN_VOLUME_ML) -> dict:
    """Evaluate every case, write ``metrics.json``, ``metrics_per_case.csv`` and ``metrics_per_lesion.csv`` (into
    ``out_dir`` or ``pred_dir``).

    Returns the summary written to metrics.json. Raises :class:`EvaluationError` naming the cases at fault when the
    two sides do not hold the same cases, geometries differ, labels are invalid or a CSV is malformed.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise EvaluationError(f"prediction folder {pred_dir} does not exist")
    if tolerance_mm < 0:
        raise EvaluationError(f"tolerance must be >= 0 mm, got {tolerance_mm}")
    gt = load_truth(truth, subtypes_csv, fold)
    known = set(gt.cases)
    pred_masks = list_masks(pred_dir)
    _check_same_cases("prediction masks", pred_masks, gt.cases, pred_dir)

    notes: list[str] = []
    pred_subtypes = probabilities = subtypes_path = None
    probabilities_path = pred_dir / PROBABILITIES_CSV
    if gt.subtypes is None:
        notes.append("the truth has no subtypes, so classification was not evaluated")
    else:
        subtypes_path = pred_dir / SUBTYPES_CSV
        if not subtypes_path.is_file():
            raise EvaluationError(f"{subtypes_path} is missing; the truth has subtypes ({gt.subtypes_source})")
        pred_subtypes = read_subtypes_csv(subtypes_path, known)
        _check_same_cases("predicted subtypes", pred_subtypes, gt.cases, subtypes_path)
        if probabilities_path.is_file():
            probabilities = read_probabilities_csv(probabilities_path, known)
            _check_same_cases("subtype probabilities", probabilities, gt.cases, probabilities_path)

    lesion_scores = _read_lesion_scores(pred_dir, known)
    if lesion_scores is None:
        notes.append("no lesion_candidates.csv (written by predict): FROC and lesion-presence AUC need its scores")

    images = Path(images_dir) if images_dir is not None else gt.images_dir
    if images is not None:
        absent = [c for c in gt.cases if not image_path(images, c).is_file()]
        if absent:
            raise EvaluationError(f"{images} lacks the images <case>{CHANNEL_SUFFIX}{NIFTI} of: {_names(absent)}")

    n_classes = len(gt.class_names) if gt.class_names else (
        len(next(iter(probabilities.values()))) if probabilities else None)
    if pred_subtypes is not None:
        _check_subtype_range(gt.subtypes, gt.subtypes_source, pred_subtypes, subtypes_path, n_classes)

    # Every mask is read once (whole, through the verified reader); all unreadable files and geometry
    # differences are collected and reported together, and no metric is computed once one is found.
    unreadable, geometry, arrays = [], {}, {}
    for case in gt.cases:
        problems = []
        try:
            truth_volume = read_mask(gt.masks[case])
            pred_volume = read_mask(pred_masks[case])
            problems += _geometry_problems(truth_volume.geometry, pred_volume.geometry, "prediction")
            if images is not None:
                problems += _geometry_problems(truth_volume.geometry, _image_geometry(image_path(images, case)),
                                               "image")
            if not problems and not unreadable and not geometry:
                arrays[case] = (label_array(truth_volume), label_array(pred_volume), truth_volume.spacing_zyx)
        except EvaluationError as e:
            unreadable.append(str(e))
        if problems:
            geometry[case] = "; ".join(problems)
    if unreadable:
        raise EvaluationError(f"{len(unreadable)} file(s) cannot be evaluated: " + " | ".join(unreadable))
    if geometry:
        raise EvaluationError(f"geometry differs for {len(geometry)} case(s): "
                              + " | ".join(f"{c}: {p}" for c, p in sorted(geometry.items())))

    rows, lesion_cases = [], []
    for case in gt.cases:
        truth_arr, pred_arr, spacing = arrays.pop(case)
        row: dict = {"case": case, **segmentation_metrics(pred_arr, truth_arr, spacing, tolerance_mm)}
        try:
            lesions = lesion_metrics.match_case(
                pred_arr, truth_arr, spacing, case,
                None if lesion_scores is None else lesion_scores.get(case, []), lesion_iou_threshold)
        except ValueError as e:
            raise EvaluationError(f"{case}: {pred_dir / 'lesion_candidates.csv'} does not fit its mask: {e}") from None
        lesion_cases.append(lesions)
        row.update(true_lesions=len(lesions.truth), detected_lesions=sum(t.detected for t in lesions.truth),
                   false_positive_lesions=sum(p.false_positive for p in lesions.predicted))
        if pred_subtypes is not None:
            row.update(subtype_true=gt.subtypes[case], subtype_pred=pred_subtypes[case],
                       correct=gt.subtypes[case] == pred_subtypes[case])
        if probabilities is not None:
            row["probabilities"] = probabilities[case]
        rows.append(row)

    classification = None
    if pred_subtypes is not None:
        try:
            classification = classification_metrics(
                [r["subtype_true"] for r in rows], [r["subtype_pred"] for r in rows],
                None if probabilities is None else np.array([r["probabilities"] for r in rows]), gt.class_names)
        except ValueError as e:
            raise EvaluationError(f"subtypes cannot be evaluated: {e}") from None

    segmentation = {m: _summary_stats([r[m] for r in rows]) for m in SEGMENTATION_METRICS}
    try:
        lesion_summary = lesion_metrics.summarise(lesion_cases, lesion_size_bins_ml, lesion_min_volume_ml,
                                                  iou_threshold=lesion_iou_threshold)
    except ValueError as e:
        raise EvaluationError(f"lesion-wise evaluation: {e}") from None
    summary = {
        "schema_version": SCHEMA_VERSION,
        "n_cases": len(rows),
        "tolerance_mm": float(tolerance_mm),
        "metric_labels": METRIC_LABELS,
        "segmentation": segmentation,
        "classification": classification,
        "lesions": lesion_summary,
        "targets": _targets(segmentation, classification),
        "conventions": EMPTY_CASE_CONVENTIONS,
        "notes": notes,
        "per_case": rows,
        "sources": {
            "pred": str(pred_dir.resolve()),
            "truth": str(Path(truth).resolve()),
            "truth_mode": gt.mode,
            "truth_masks": str(gt.masks[gt.cases[0]].parent.resolve()),
            "fold": gt.fold,
            "subtypes": None if gt.subtypes_source is None else str(gt.subtypes_source.resolve()),
            "probabilities": str(probabilities_path.resolve()) if probabilities is not None else None,
            "images": None if images is None else str(images.resolve()),
        },
    }
    out = make_dirs(Path(out_dir)) if out_dir is not None else pred_dir
    tmp = temp_path(out / METRICS_JSON)
    try:
        tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        _write_per_case_csv(out / PER_CASE_CSV, rows, len(probabilities[gt.cases[0]]) if probabilities else 0)
        _write_lesion_csv(out / PER_LESION_CSV, lesion_cases)
        os.replace(tmp, out / METRICS_JSON)
    finally:
        tmp.unlink(missing_ok=True)
    return summary


def format_summary(summary: dict) -> str:
    """A short plain-text table of the headline numbers, for the terminal."""
    lines = [f"{summary['n_cases']} cases; surface tolerance {summary['tolerance_mm']:g} mm",
             f"{'metric':<34}{'mean':>9}{'median':>9}"]
    for key, stats in summary["segmentation"].items():
        lines.append(f"{METRIC_LABELS[key]:<34}{stats['mean']:>9.4f}{stats['median']:>9.4f}")
    cls = summary["classification"]
    if cls is not None:
        lines.append(f"subtype: accuracy {cls['accuracy']:.4f}, balanced accuracy {cls['balanced_accuracy']:.4f}, "
                     f"macro-F1 {cls['macro']['f1']:.4f}, weighted-F1 {cls['weighted']['f1']:.4f}")
        if cls["auc_ovr"] is not None:
            auc = cls["auc_ovr"]["macro"]
            lines.append(f"subtype: macro one-vs-rest AUC {'n/a' if auc is None else f'{auc:.4f}'}, "
                         f"ECE {cls['calibration']['ece']:.4f}")
        width = max(len(n) for n in cls["class_names"]) + 2
        lines.append("confusion matrix (rows truth, columns prediction):")
        lines.append(" " * width + "".join(f"{n:>{width}}" for n in cls["class_names"]))
        for name, row in zip(cls["class_names"], cls["confusion_matrix"]):
            lines.append(f"{name:<{width}}" + "".join(f"{v:>{width}}" for v in row))
    if summary.get("lesions"):
        lines.extend(lesion_metrics.format_lesion_summary(summary["lesions"]))
    for target in summary["targets"]:
        if target["value"] is not None:
            verdict = "met" if target["met"] else "NOT met"
            lines.append(f"target {target['label']} >= {target['threshold']:g}: {target['value']:.4f} {verdict}")
    lines.extend(f"note: {n}" for n in summary["notes"])
    return "\n".join(lines)


def headline(metrics: dict) -> dict[str, float]:
    """The task's case-level numbers in one line: whole-pancreas Dice, lesion Dice, accuracy, macro-F1, and the
    subtype's expected calibration error when probabilities were given."""
    segmentation, classification = metrics["segmentation"], metrics.get("classification") or {}
    numbers = {"whole_pancreas_dice": segmentation["dice_pancreas"]["mean"],
               "lesion_dice": segmentation["dice_lesion"]["mean"]}
    if classification:
        numbers.update(accuracy=classification["accuracy"], macro_f1=classification["macro"]["f1"])
        if classification.get("calibration"):
            numbers["ece"] = classification["calibration"]["ece"]
    return {k: round(float(v), 4) for k, v in numbers.items()}
