"""Evaluation metrics against independent computations (scikit-learn, hand-made volumes, brute-force surface
distances) and the folder evaluation's contracts and errors. The synthetic-set helpers here are reused by
test_report.py."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from sklearn import metrics as skm

from nnunet_mtl.cli import main
from nnunet_mtl.evaluation.evaluate import EvaluationError, evaluate_folder, format_summary
from nnunet_mtl.evaluation.metrics import (
    SEGMENTATION_METRICS,
    classification_metrics,
    dice,
    segmentation_metrics,
    surface_metrics,
)

SPACING_ZYX = (2.0, 0.7, 0.7)
SHAPE = (16, 48, 64)


# ---------------------------------------------------------------- synthetic data (shared with test_report.py)

def ellipsoid(shape: tuple[int, int, int], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + \
        ((x - centre[2]) / radii[2]) ** 2 <= 1.0


def label_map(shape, centre, pancreas_radii, lesion_centre, lesion_radii) -> np.ndarray:
    labels = ellipsoid(shape, centre, pancreas_radii).astype(np.uint8)
    if lesion_radii is not None:
        labels[ellipsoid(shape, lesion_centre, lesion_radii) & (labels > 0)] = 2
    return labels


def write_nifti(path: Path, array: np.ndarray, spacing_zyx=SPACING_ZYX, origin=(0.0, 0.0, 0.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))


def ct_image(labels: np.ndarray, subtype: int, rng: np.random.Generator) -> np.ndarray:
    """int16 CT-like crop: fat background, a vessel, enhancing pancreas, a lesion whose density depends on subtype."""
    ct = np.full(labels.shape, -90.0)
    ct[ellipsoid(labels.shape, (labels.shape[0] / 2, 8, 10), (99, 5, 5))] = 180.0
    ct[labels == 1] = 60.0
    ct[labels == 2] = (10.0, 0.0, 130.0)[subtype % 3]
    return (ct + rng.normal(0, 12, labels.shape)).astype(np.int16)


def make_synthetic_set(root: Path, n_cases: int = 6, seed: int = 0, probabilities: bool = True,
                       shape=SHAPE) -> dict[str, Path]:
    """Truth masks + subtype CSV, predictions (shifted, some lesions missed), images; with ``probabilities`` also
    subtype probabilities and predict's lesion_candidates.csv (a false lesion speck in every third case, a lesion
    score per component); returns the folders."""
    from nnunet_mtl.inference.lesion_candidates import find_candidates, write_candidates_table

    rng = np.random.default_rng(seed)
    score_rng = np.random.default_rng(seed + 1000)  # its own stream: the masks stay those of earlier versions
    candidates = {}
    folders = {name: root / name for name in ("truth", "pred", "images")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    truth_rows, pred_rows, prob_rows = [], [], []
    for i in range(n_cases):
        case = f"quiz_{i:03d}"
        subtype = i % 3
        centre = (shape[0] / 2 + rng.uniform(-1, 1), shape[1] / 2 + rng.uniform(-2, 2), shape[2] / 2)
        radii = (shape[0] * 0.3, shape[1] * 0.25, shape[2] * 0.35)
        lesion_centre = (centre[0], centre[1], centre[2] + radii[2] * 0.4)
        lesion_radii = (radii[0] * 0.6, radii[1] * 0.5, radii[2] * 0.3)
        truth = label_map(shape, centre, radii, lesion_centre, lesion_radii)
        shift = (0, rng.integers(0, 3), rng.integers(-2, 3))
        pred_lesion = None if i % 4 == 3 else tuple(r * rng.uniform(0.6, 1.2) for r in lesion_radii)
        pred = label_map(shape, tuple(c + s for c, s in zip(centre, shift)), radii,
                         tuple(c + s for c, s in zip(lesion_centre, shift)), pred_lesion)
        if probabilities and i % 3 == 1:
            pred[1, 2, 2:4] = 2  # a false lesion in a corner, away from the gland
        lesion_probability = np.where(pred == 2, score_rng.uniform(0.4, 1.0, pred.shape), 0.05)
        candidates[case] = find_candidates(pred, lesion_probability, SPACING_ZYX)[1]
        write_nifti(folders["truth"] / f"{case}.nii.gz", truth)
        write_nifti(folders["pred"] / f"{case}.nii.gz", pred)
        write_nifti(folders["images"] / f"{case}_0000.nii.gz", ct_image(truth, subtype, rng))
        predicted = subtype if i % 5 != 4 else (subtype + 1) % 3
        logits = rng.normal(0, 1, 3)
        logits[predicted] += 2.5
        p = np.exp(logits) / np.exp(logits).sum()
        truth_rows.append([f"{case}.nii.gz", subtype])
        pred_rows.append([f"{case}.nii.gz", predicted])
        prob_rows.append([f"{case}.nii.gz", predicted, *p.round(6)])
    write_csv(folders["truth"] / "subtype_results.csv", ["Names", "Subtype"], truth_rows)
    write_csv(folders["pred"] / "subtype_results.csv", ["Names", "Subtype"], pred_rows)
    if probabilities:
        write_csv(folders["pred"] / "subtype_probabilities.csv", ["Names", "Subtype", "prob_0", "prob_1", "prob_2"],
                  prob_rows)
        write_candidates_table(folders["pred"], candidates)
    return folders


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def brute_force_surface(pred: np.ndarray, truth: np.ndarray, spacing, tolerance: float) -> tuple[float, float]:
    """Independent NSD / HD95: boundary voxels by one erosion, exact nearest distances with a KD-tree."""
    from scipy.ndimage import binary_erosion
    from scipy.spatial import cKDTree

    points = [np.argwhere(m & ~binary_erosion(m)) * np.asarray(spacing) for m in (pred, truth)]
    d_pt = cKDTree(points[1]).query(points[0])[0]
    d_tp = cKDTree(points[0]).query(points[1])[0]
    nsd = ((d_pt <= tolerance).sum() + (d_tp <= tolerance).sum()) / (len(d_pt) + len(d_tp))
    return float(nsd), float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


# ---------------------------------------------------------------- pure segmentation metrics

def cube(offset_zyx=(0, 0, 0), shape=(30, 40, 40), low=(5, 10, 10), size=(10, 20, 20)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(lo + o, lo + o + s) for lo, o, s in zip(low, offset_zyx, size))] = True
    return mask


def test_dice_of_offset_cubes_and_empty_conventions():
    # 10 slices shifted by one: 9 overlap, Dice = 2 * 9 / 20
    assert dice(cube(), cube((1, 0, 0))) == pytest.approx(0.9)
    assert dice(cube(), cube((0, 0, 5))) == pytest.approx(2 * 15 / 40)
    empty = np.zeros((30, 40, 40), bool)
    assert dice(empty, empty) == 1.0
    assert dice(cube(), empty) == 0.0 and dice(empty, cube()) == 0.0


def test_hd95_and_nsd_of_parallel_plates_are_exact():
    # one-voxel plates three slices apart at 2 mm: every boundary point is exactly 6 mm from the other plate
    a, b = np.zeros((20, 30, 30), bool), np.zeros((20, 30, 30), bool)
    a[5, 5:20, 5:20], b[8, 5:20, 5:20] = True, True
    nsd, hd95 = surface_metrics(a, b, SPACING_ZYX, tolerance_mm=5.9)
    assert hd95 == pytest.approx(6.0) and nsd == 0.0
    assert surface_metrics(a, b, SPACING_ZYX, tolerance_mm=6.0)[0] == pytest.approx(1.0)


def test_surface_metrics_use_spacing_in_zyx_order():
    # the same one-voxel shift is 0.7 mm along x but 2 mm along z
    nsd_x, hd_x = surface_metrics(cube(), cube((0, 0, 1)), SPACING_ZYX, tolerance_mm=1.0)
    nsd_z, hd_z = surface_metrics(cube(), cube((1, 0, 0)), SPACING_ZYX, tolerance_mm=1.0)
    assert hd_x == pytest.approx(0.7, abs=1e-5) and nsd_x == pytest.approx(1.0)
    assert hd_z == pytest.approx(2.0) and nsd_z < 0.9
    # the maximum distance of z-shifted cubes is exactly the shift; 95th percentile cannot exceed it
    assert surface_metrics(cube(), cube((1, 0, 0)), SPACING_ZYX, tolerance_mm=2.0)[0] == pytest.approx(1.0)


def test_surface_metrics_match_brute_force_on_ellipsoids():
    shape = (24, 50, 60)
    truth = ellipsoid(shape, (12, 25, 30), (7, 15, 20))
    pred = ellipsoid(shape, (13, 27, 28), (6, 13, 23))
    for tolerance in (0.5, 1.0, 1.75, 3.2):  # none equal to a distance that float rounding could tip
        nsd, hd95 = surface_metrics(pred, truth, SPACING_ZYX, tolerance)
        ref_nsd, ref_hd95 = brute_force_surface(pred, truth, SPACING_ZYX, tolerance)
        assert nsd == pytest.approx(ref_nsd, abs=1e-6)
        assert hd95 == pytest.approx(ref_hd95, rel=1e-4)


def test_segmentation_metrics_labels_and_empty_lesion_conventions():
    truth = label_map(SHAPE, (8, 24, 32), (5, 12, 20), (8, 24, 40), (3, 5, 6))
    no_lesion = np.where(truth == 2, 1, truth).astype(np.uint8)
    missed = segmentation_metrics(no_lesion, truth, SPACING_ZYX)
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE, SPACING_ZYX)))
    assert missed["dice_pancreas"] == 1.0 and missed["hd95_pancreas"] == 0.0 and missed["nsd_pancreas"] == 1.0
    assert (missed["dice_lesion"], missed["nsd_lesion"]) == (0.0, 0.0)
    assert missed["hd95_lesion"] == pytest.approx(diagonal)
    both_empty = segmentation_metrics(no_lesion, no_lesion, SPACING_ZYX)
    assert (both_empty["dice_lesion"], both_empty["nsd_lesion"], both_empty["hd95_lesion"]) == (1.0, 1.0, 0.0)
    # swapping labels 1 and 2 keeps the whole pancreas perfect and ruins the rest
    swapped = np.choose(truth, [0, 2, 1]).astype(np.uint8)
    result = segmentation_metrics(swapped, truth, SPACING_ZYX)
    assert result["dice_pancreas"] == 1.0 and result["dice_lesion"] == 0.0 and result["dice_label1"] == 0.0
    voxel_ml = np.prod(SPACING_ZYX) / 1000
    assert result["truth_lesion_ml"] == pytest.approx((truth == 2).sum() * voxel_ml)
    assert set(SEGMENTATION_METRICS) <= set(result)


# ---------------------------------------------------------------- classification

def test_classification_metrics_match_scikit_learn():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 3, 60)
    probabilities = rng.dirichlet([1, 1, 1], 60)
    probabilities[np.arange(60), y_true] += rng.uniform(0, 0.8, 60)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    y_pred = probabilities.argmax(axis=1)
    result = classification_metrics(y_true, y_pred, probabilities, ["a", "b", "c"])

    assert result["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert result["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
    assert result["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred).tolist()
    report = skm.classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    for row in result["per_class"]:
        ref = report[str(row["label"])]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (ref["precision"], ref["recall"], ref["f1-score"], ref["support"]))
    for average, key in (("macro", "macro avg"), ("weighted", "weighted avg")):
        ref = report[key]
        assert (result[average]["precision"], result[average]["recall"], result[average]["f1"]) == pytest.approx(
            (ref["precision"], ref["recall"], ref["f1-score"]))
        assert result[average]["f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average=average))
    for k in range(3):
        assert result["auc_ovr"]["per_class"][k] == pytest.approx(skm.roc_auc_score(y_true == k, probabilities[:, k]))
    assert result["auc_ovr"]["macro"] == pytest.approx(skm.roc_auc_score(y_true, probabilities, multi_class="ovr"))

    # expected calibration error, written out independently: bins (lower, upper], confidence = top probability
    confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == y_true
    ece = 0.0
    for lower in np.arange(10) / 10:
        members = (confidence > lower) & (confidence <= lower + 0.1)
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    assert result["calibration"]["ece"] == pytest.approx(ece)
    assert sum(b["count"] for b in result["calibration"]["bins"]) == 60
    json.dumps(result, allow_nan=False)


def test_reported_confusion_matrix_gives_accuracy_075_and_macro_f1_07389():
    matrix = [[6, 2, 1], [0, 14, 1], [1, 4, 7]]
    y_true = [t for t, row in enumerate(matrix) for p, n in enumerate(row) for _ in range(n)]
    y_pred = [p for t, row in enumerate(matrix) for p, n in enumerate(row) for _ in range(n)]
    result = classification_metrics(y_true, y_pred)
    assert result["confusion_matrix"] == matrix
    assert result["accuracy"] == pytest.approx(0.75)
    assert round(result["macro"]["f1"], 4) == 0.7389
    assert result["class_names"] == ["subtype 0", "subtype 1", "subtype 2"]
    assert result["auc_ovr"] is None and result["calibration"] is None


def test_classification_handles_absent_classes():
    probabilities = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    result = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], probabilities)
    assert len(result["confusion_matrix"]) == 3 and result["per_class"][2]["support"] == 0
    assert result["per_class"][2]["precision"] == 0.0
    assert result["auc_ovr"]["per_class"][2] is None
    assert result["auc_ovr"]["macro"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside"):
        classification_metrics([0, 3], [0, 1], class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="shape"):
        classification_metrics([0, 1], [0, 1], np.ones((2, 2)) / 2, ["a", "b", "c"])


# ---------------------------------------------------------------- folder evaluation

def read_per_case_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_mask_folder_writes_metrics_and_per_case_csv(tmp_path):
    folders = make_synthetic_set(tmp_path, n_cases=6)
    summary = evaluate_folder(folders["pred"], folders["truth"], images_dir=folders["images"], tolerance_mm=1.5)
    written = json.loads((folders["pred"] / "metrics.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["n_cases"] == 6 and written["tolerance_mm"] == 1.5
    assert written["sources"]["images"] == str(folders["images"].resolve())
    assert written["sources"]["truth_masks"] == str(folders["truth"].resolve())
    assert written["sources"]["probabilities"].endswith("subtype_probabilities.csv")
    rows = read_per_case_csv(folders["pred"] / "metrics_per_case.csv")
    assert [r["case"] for r in rows] == [f"quiz_{i:03d}" for i in range(6)]
    assert {"prob_0", "prob_2", "subtype_true", "subtype_pred"} <= set(rows[0])

    # every per-case number equals a direct computation on the files
    for row in rows:
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(folders["truth"] / f"{row['case']}.nii.gz")))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(folders["pred"] / f"{row['case']}.nii.gz")))
        direct = segmentation_metrics(pred, truth, SPACING_ZYX, 1.5)
        for metric in SEGMENTATION_METRICS:
            assert float(row[metric]) == pytest.approx(direct[metric])
    for metric in SEGMENTATION_METRICS:
        values = [float(r[metric]) for r in rows]
        assert written["segmentation"][metric]["mean"] == pytest.approx(np.mean(values))
        assert written["segmentation"][metric]["median"] == pytest.approx(np.median(values))
    y_true = [int(r["subtype_true"]) for r in rows]
    y_pred = [int(r["subtype_pred"]) for r in rows]
    assert written["classification"]["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred).tolist()
    assert written["classification"]["macro"]["f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    assert [t["metric"] for t in written["targets"]] == ["dice_pancreas", "dice_lesion", "macro_f1"]
    text = format_summary(summary)
    assert "Dice whole pancreas" in text and "confusion matrix" in text

    # lesion-wise: per case counts from independent flood-fill components, per-lesion rows, printed lines
    from test_lesions import flood_components

    lesions = written["lesions"]
    per_lesion = read_per_case_csv(folders["pred"] / "metrics_per_lesion.csv")
    for row in rows:
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(folders["truth"] / f"{row['case']}.nii.gz")))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(folders["pred"] / f"{row['case']}.nii.gz")))
        assert int(row["true_lesions"]) == len(flood_components(truth == 2))
        mine = [r for r in per_lesion if r["case"] == row["case"]]
        assert sum(r["kind"] == "predicted" for r in mine) == len(flood_components(pred == 2))
        assert int(row["false_positive_lesions"]) == sum(r["status"] == "false_positive" for r in mine)
    assert lesions["false_positives"]["total"] == 2 and lesions["false_positives"]["by_location"]["outside"] == 2
    assert lesions["n_detected"] == sum(r["status"] == "detected" for r in per_lesion) > 0
    assert lesions["froc"]["fp_per_case"][-1] == pytest.approx(2 / 6) and lesions["presence_auc"] is None
    assert "lesion sensitivity by size" in text and "false-positive lesions: 2 (0.33 per case" in text


def write_raw_dataset(root: Path, folders: dict[str, Path], val: list[str]) -> Path:
    """The same cases as an nnU-Net raw dataset with subtypes in dataset.json and a two-fold split."""
    raw = root / "Dataset500_Test"
    (raw / "labelsTr").mkdir(parents=True)
    (raw / "imagesTr").mkdir()
    cases = sorted(p.name[:-7] for p in folders["truth"].glob("*.nii.gz"))
    subtypes = {}
    with open(folders["truth"] / "subtype_results.csv") as f:
        for row in list(csv.reader(f))[1:]:
            subtypes[row[0][:-7]] = int(row[1])
    for case in cases:
        (raw / "labelsTr" / f"{case}.nii.gz").write_bytes((folders["truth"] / f"{case}.nii.gz").read_bytes())
        (raw / "imagesTr" / f"{case}_0000.nii.gz").write_bytes(
            (folders["images"] / f"{case}_0000.nii.gz").read_bytes())
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "pancreas": [1, 2], "lesion": 2},
               "numTraining": len(cases), "file_ending": ".nii.gz", "case_subtypes": subtypes,
               "subtype_names": {"0": "solid", "1": "cystic", "2": "enhancing"}}
    (raw / "dataset.json").write_text(json.dumps(dataset))
    other = [c for c in cases if c not in val]
    (raw / "splits_final.json").write_text(json.dumps([{"train": other, "val": val}, {"train": val, "val": other}]))
    return raw


def test_evaluate_nnunet_raw_dataset_uses_validation_fold(tmp_path):
    folders = make_synthetic_set(tmp_path, n_cases=6)
    val = ["quiz_001", "quiz_002", "quiz_004"]
    raw = write_raw_dataset(tmp_path, folders, val)
    for p in folders["pred"].glob("quiz_*.nii.gz"):
        if p.name[:-7] not in val:
            p.unlink()
    for name in ("subtype_results.csv", "subtype_probabilities.csv", "lesion_candidates.csv"):
        with open(folders["pred"] / name) as f:
            header, *rows = list(csv.reader(f))
        write_csv(folders["pred"] / name, header, [r for r in rows if r[0][:-7] in val])
    summary = evaluate_folder(folders["pred"], raw, fold=0, out_dir=tmp_path / "out")
    assert [r["case"] for r in summary["per_case"]] == val
    assert summary["classification"]["class_names"] == ["solid", "cystic", "enhancing"]
    assert summary["sources"]["images"] == str((raw / "imagesTr").resolve())
    assert summary["sources"]["fold"] == 0 and summary["sources"]["truth_mode"] == "nnunet_raw"
    assert (tmp_path / "out" / "metrics.json").is_file()
    with pytest.raises(EvaluationError, match="missing: quiz_000, quiz_003, quiz_005"):
        evaluate_folder(folders["pred"], raw, fold=1)
    with pytest.raises(EvaluationError, match="fold 5 does not exist"):
        evaluate_folder(folders["pred"], raw, fold=5)


def test_missing_and_mismatched_cases_are_named(tmp_path):
    folders = make_synthetic_set(tmp_path, n_cases=4, probabilities=False)
    (folders["pred"] / "quiz_002.nii.gz").unlink()
    with pytest.raises(EvaluationError, match=r"1 case\(s\) missing: quiz_002"):
        evaluate_folder(folders["pred"], folders["truth"])
    (folders["pred"] / "quiz_002.nii.gz").write_bytes((folders["truth"] / "quiz_002.nii.gz").read_bytes())
    (folders["pred"] / "quiz_002.nii.gz").rename(folders["pred"] / "quiz_02.nii.gz")
    with pytest.raises(EvaluationError, match=r"missing: quiz_002; 1 case\(s\) not in the truth: quiz_02"):
        evaluate_folder(folders["pred"], folders["truth"])
    (folders["pred"] / "quiz_02.nii.gz").rename(folders["pred"] / "quiz_002.nii.gz")
    with pytest.raises(EvaluationError, match="images <case>_0000.nii.gz of: quiz_000"):
        evaluate_folder(folders["pred"], folders["truth"], images_dir=tmp_path / "nowhere")
    write_csv(folders["pred"] / "subtype_results.csv", ["Names", "Subtype"],
              [["quiz_000.nii.gz", 0], ["quiz_001.nii.gz", 1], ["quiz_002.nii.gz", 2]])
    with pytest.raises(EvaluationError, match="predicted subtypes .* missing: quiz_003"):
        evaluate_folder(folders["pred"], folders["truth"])


def test_csv_format_errors(tmp_path):
    folders = make_synthetic_set(tmp_path, n_cases=3, probabilities=False)
    write_csv(folders["pred"] / "subtype_results.csv", ["Name", "Subtype"],
              [[f"quiz_{i:03d}.nii.gz", 0] for i in range(3)])
    with pytest.raises(EvaluationError, match="expected exactly 'Names,Subtype'"):
        evaluate_folder(folders["pred"], folders["truth"])
    write_csv(folders["pred"] / "subtype_results.csv", ["Names", "Subtype"],
              [["quiz_000_0000.nii.gz", 0], ["quiz_001.nii.gz", 1], ["quiz_001.nii.gz", 2]])
    with pytest.raises(EvaluationError, match="quiz_001 listed twice"):
        evaluate_folder(folders["pred"], folders["truth"])
    (folders["pred"] / "subtype_results.csv").unlink()
    with pytest.raises(EvaluationError, match="subtype_results.csv is missing"):
        evaluate_folder(folders["pred"], folders["truth"])


def test_geometry_mismatch_names_the_case(tmp_path):
    folders = make_synthetic_set(tmp_path, n_cases=3, probabilities=False)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folders["pred"] / "quiz_001.nii.gz")))
    write_nifti(folders["pred"] / "quiz_001.nii.gz", labels, spacing_zyx=(2.0, 0.8, 0.7))
    write_nifti(folders["pred"] / "quiz_002.nii.gz", labels, origin=(5.0, 0.0, 0.0))
    with pytest.raises(EvaluationError, match=r"geometry differs for 2 case\(s\): quiz_001: prediction spacing"
                                              r".* \| quiz_002: prediction origin"):
        evaluate_folder(folders["pred"], folders["truth"])
    write_nifti(folders["pred"] / "quiz_001.nii.gz", labels[:, :-1])
    with pytest.raises(EvaluationError, match="quiz_001: prediction size"):
        evaluate_folder(folders["pred"], folders["truth"])


def test_float_masks_are_rounded_and_bad_labels_rejected(tmp_path):
    folders = make_synthetic_set(tmp_path, n_cases=3, probabilities=False)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(folders["truth"] / "quiz_000.nii.gz")))
    # the real data's quirk: 1 stored as 1.0000152587890625
    write_nifti(folders["truth"] / "quiz_000.nii.gz", np.where(truth == 1, 1.0000152587890625, truth).astype(
        np.float32))
    summary = evaluate_folder(folders["pred"], folders["truth"])
    assert summary["n_cases"] == 3
    write_nifti(folders["pred"] / "quiz_001.nii.gz", np.full(SHAPE, 3, np.uint8))
    with pytest.raises(EvaluationError, match=r"quiz_001.nii.gz: labels \[3\]"):
        evaluate_folder(folders["pred"], folders["truth"])


def test_truth_without_subtypes_evaluates_segmentation_only(tmp_path):
    folders = make_synthetic_set(tmp_path, n_cases=2, probabilities=False)
    (folders["truth"] / "subtype_results.csv").rename(tmp_path / "truth_subtypes.csv")
    summary = evaluate_folder(folders["pred"], folders["truth"])
    assert summary["classification"] is None and "classification was not evaluated" in summary["notes"][0]
    summary = evaluate_folder(folders["pred"], folders["truth"], subtypes_csv=tmp_path / "truth_subtypes.csv")
    assert summary["classification"]["n_cases"] == 2


def test_candidates_that_do_not_fit_the_masks_are_refused(tmp_path, capsys):
    folders = make_synthetic_set(tmp_path, n_cases=3)
    table = folders["pred"] / "lesion_candidates.csv"
    lines = table.read_text().splitlines()
    row = lines[1].split(",")
    row[4:7] = ["0", "0", "0"]  # the peak voxel of the first component moved to the corner: no lesion there
    table.write_text("\n".join([lines[0], ",".join(row), *lines[2:]]) + "\n")
    with pytest.raises(EvaluationError, match=f"{row[0][:-7]}: .*lesion_candidates.csv does not fit its mask"):
        evaluate_folder(folders["pred"], folders["truth"])
    table.write_text("\n".join([lines[0], *lines[2:]]) + "\n")  # a component left without a score
    assert main(["evaluate", "--pred", str(folders["pred"]), "--truth", str(folders["truth"])]) == 2
    assert "have no score" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:  # argparse's exit for a malformed option
        main(["evaluate", "--pred", str(folders["pred"]), "--truth", str(folders["truth"]), "--lesion-bins", "1,0.5"])
    assert error.value.code == 2 and "increasing positive volumes" in capsys.readouterr().err
    table.unlink()  # no table: lesion-wise numbers without FROC, and a note saying why
    summary = evaluate_folder(folders["pred"], folders["truth"], lesion_size_bins_ml=(1.0,))
    assert summary["lesions"]["froc"] is None and any("lesion_candidates.csv" in n for n in summary["notes"])
    assert [b["bin"] for b in summary["lesions"]["by_size"]] == ["< 1 ml", ">= 1 ml"]


def test_cli_evaluate_prints_table_and_fails_with_exit_2(tmp_path, capsys):
    folders = make_synthetic_set(tmp_path, n_cases=3)
    out = tmp_path / "metrics"
    assert main(["evaluate", "--pred", str(folders["pred"]), "--truth", str(folders["truth"]),
                 "--images", str(folders["images"]), "--tolerance-mm", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Dice lesion" in printed and "macro-F1" in printed
    assert (out / "metrics.json").is_file() and (out / "metrics_per_case.csv").is_file()
    (folders["pred"] / "quiz_001.nii.gz").unlink()
    assert main(["evaluate", "--pred", str(folders["pred"]), "--truth", str(folders["truth"])]) == 2
    assert "quiz_001" in capsys.readouterr().err
