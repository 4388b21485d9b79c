"""Case-level metrics (evaluation/metrics.py) against independent computations: scikit-learn, hand-made volumes with
hand-worked answers, brute-force surface distances. Pure functions on arrays; fast enough for mutation testing."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm
from volumes import SHAPE, SPACING_ZYX, ellipsoid, label_map

from nnunet_mtl.evaluation.metrics import (
    SEGMENTATION_METRICS,
    calibration,
    classification_metrics,
    dice,
    segmentation_metrics,
    surface_metrics,
)


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


def test_dice_counts_voxels_of_any_label_once():
    """Label maps are masks of their non-zero voxels: a 2 counts once, like a 1."""
    assert dice(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 0])) == pytest.approx(2 * 2 / (3 + 2))


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


def test_hd95_is_the_95th_percentile_of_a_spread_of_distances():
    """A small cube with a 20-voxel spur: the spur's distances (0.7 to 14 mm) fill the top quarter, so the 95th
    percentile is one of them and differs from its neighbours (boundary distances of plain shapes often tie)."""
    truth = np.zeros((8, 8, 40), bool)
    truth[2:6, 2:6, 2:6] = True
    pred = truth.copy()
    pred[3, 3, 6:26] = True
    _, hd95 = surface_metrics(pred, truth, SPACING_ZYX)
    _, reference = brute_force_surface(pred, truth, SPACING_ZYX, 2.0)
    assert hd95 == pytest.approx(reference, rel=1e-4)
    from scipy.ndimage import binary_erosion
    from scipy.spatial import cKDTree

    points = [np.argwhere(m & ~binary_erosion(m)) * np.asarray(SPACING_ZYX) for m in (pred, truth)]
    distances = cKDTree(points[1]).query(points[0])[0]
    assert abs(np.percentile(distances, 96) - hd95) > 0.1 and abs(np.percentile(distances, 94) - hd95) > 0.1


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


def test_shape_and_spacing_mismatches_are_refused():
    with pytest.raises(ValueError, match=r"mask shapes differ: \(30, 40, 40\) vs \(30, 40, 41\)"):
        dice(cube(), cube(shape=(30, 40, 41)))
    with pytest.raises(ValueError, match=r"mask shapes differ: \(30, 40, 40\) vs \(30, 40, 41\)"):
        surface_metrics(cube(), cube(shape=(30, 40, 41)), SPACING_ZYX)
    with pytest.raises(ValueError, match=r"spacing \(2.0, 0.7\) does not match a 3D mask"):
        surface_metrics(cube(), cube(), SPACING_ZYX[:2])
    with pytest.raises(ValueError, match=r"label map shapes differ: \(30, 40, 40\) vs \(30, 40, 41\)"):
        segmentation_metrics(cube().astype(np.uint8), cube(shape=(30, 40, 41)).astype(np.uint8), SPACING_ZYX)


def test_surface_metrics_of_one_empty_mask_and_without_monai_warnings():
    empty = np.zeros((30, 40, 40), bool)
    diagonal = math.sqrt((30 * 2.0) ** 2 + (40 * 0.7) ** 2 + (40 * 0.7) ** 2)
    for pred, truth in ((cube(), empty), (empty, cube())):
        nsd, hd95 = surface_metrics(pred, truth, SPACING_ZYX)
        assert nsd == 0.0 and hd95 == pytest.approx(diagonal)
    assert surface_metrics(empty, empty, SPACING_ZYX) == (1.0, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MONAI's deprecation noise on every call is filtered, nothing else leaks
        nsd, hd95 = surface_metrics(cube(), cube((0, 0, 1)), SPACING_ZYX, tolerance_mm=0.5)
    assert hd95 == pytest.approx(0.7, abs=1e-5) and nsd < 1.0
    # the default tolerance is 2 mm: a one-slice shift along z (2 mm) is within it, along nothing else beyond it
    assert surface_metrics(cube(), cube((1, 0, 0)), SPACING_ZYX)[0] == pytest.approx(1.0)
    assert surface_metrics(cube(), cube((2, 0, 0)), SPACING_ZYX)[0] < 1.0


def test_segmentation_metrics_volumes_and_label1():
    truth = label_map(SHAPE, (8, 24, 32), (5, 12, 20), (8, 24, 40), (3, 5, 6))
    pred = np.roll(truth, 2, axis=2)  # 1.4 mm: inside the default 2 mm tolerance, outside the 1 mm asked for
    result = segmentation_metrics(pred, truth, SPACING_ZYX, tolerance_mm=1.0)
    assert result["nsd_pancreas"] < segmentation_metrics(pred, truth, SPACING_ZYX)["nsd_pancreas"] == 1.0
    voxel_ml = 2.0 * 0.7 * 0.7 / 1000
    for name, label in (("pancreas", truth > 0), ("lesion", truth == 2)):
        assert result[f"truth_{name}_ml"] == pytest.approx(label.sum() * voxel_ml)
    assert result["pred_pancreas_ml"] == pytest.approx((pred > 0).sum() * voxel_ml)
    assert result["pred_lesion_ml"] == pytest.approx((pred == 2).sum() * voxel_ml)
    one = (pred == 1) & (truth == 1)
    assert result["dice_label1"] == pytest.approx(2 * one.sum() / ((pred == 1).sum() + (truth == 1).sum()))
    assert result["dice_lesion"] == pytest.approx(dice(pred == 2, truth == 2)) and result["dice_lesion"] < 1
    nsd, hd95 = brute_force_surface(pred == 2, truth == 2, SPACING_ZYX, 1.0)
    assert (result["nsd_lesion"], result["hd95_lesion"]) == pytest.approx((nsd, hd95), rel=1e-4)
    nsd, hd95 = brute_force_surface(pred > 0, truth > 0, SPACING_ZYX, 1.0)
    assert (result["nsd_pancreas"], result["hd95_pancreas"]) == pytest.approx((nsd, hd95), rel=1e-4)
    assert sorted(result) == sorted([*SEGMENTATION_METRICS, "truth_pancreas_ml", "pred_pancreas_ml",
                                     "truth_lesion_ml", "pred_lesion_ml"])


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


def test_calibration_bins_are_upper_inclusive_and_cover_zero_to_one():
    """Bins (lower, upper]: a confidence of exactly 0.5 belongs to (0.4, 0.5], 1.0 to the last bin; with twelve
    classes a confidence can fall into the first bin."""
    probabilities = np.zeros((5, 12))
    probabilities[0, 0] = 0.5  # correct
    probabilities[0, 1:] = 0.5 / 11
    probabilities[1, 2] = 1.0  # wrong (truth 1)
    probabilities[2] = 1 / 12  # all equal: confidence 1/12 in (0, 0.1], argmax 0, correct
    probabilities[3, 3], probabilities[3, 4:] = 0.55, 0.45 / 8  # correct (truth 3)
    probabilities[4, 5], probabilities[4, 6:] = 0.95, 0.05 / 6  # wrong (truth 0)
    result = calibration(np.array([0, 1, 0, 3, 0]), probabilities)
    bins = result["bins"]
    assert [b["count"] for b in bins] == [1, 0, 0, 0, 1, 1, 0, 0, 0, 2]
    assert [b["lower"] for b in bins] == pytest.approx(np.arange(10) / 10)
    assert [b["upper"] for b in bins] == pytest.approx(np.arange(1, 11) / 10)
    assert (bins[0]["accuracy"], bins[0]["confidence"]) == pytest.approx((1.0, 1 / 12))
    assert (bins[4]["accuracy"], bins[4]["confidence"]) == pytest.approx((1.0, 0.5))
    assert (bins[5]["accuracy"], bins[5]["confidence"]) == pytest.approx((1.0, 0.55))
    assert (bins[9]["accuracy"], bins[9]["confidence"]) == pytest.approx((0.0, 0.975))
    assert bins[1]["accuracy"] is None and bins[1]["confidence"] is None
    expected = (abs(1 - 1 / 12) + abs(1 - 0.5) + abs(1 - 0.55) + 2 * 0.975) / 5
    assert result["ece"] == pytest.approx(expected) and result["n_bins"] == 10
    assert [b["count"] for b in calibration(np.array([0, 1, 0, 3, 0]), probabilities, n_bins=4)["bins"]] == \
        [1, 1, 1, 2]
    rounded_up = np.array([[1.0000001, 0.0, 0.0], [0.5, 0.3, 0.2]])  # a CSV's rounding can pass 1
    bins = calibration(np.array([0, 1]), rounded_up)["bins"]
    assert bins[9]["count"] == 1 and bins[4]["count"] == 1 and sum(b["count"] for b in bins) == 2


def test_classification_metrics_input_rules():
    with pytest.raises(ValueError, match="need two equally long, non-empty label lists"):
        classification_metrics([], [])
    with pytest.raises(ValueError, match="need two equally long"):
        classification_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="need two equally long"):
        classification_metrics([[0, 1]], [[0, 1]])
    with pytest.raises(ValueError, match=r"labels \[3\] outside 0..2"):
        classification_metrics([0, 1], [0, 3], np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match=r"probabilities have shape \(2, 2\), expected \(2, 3\)"):
        classification_metrics([0, 1], [0, 1], np.full((2, 2), 0.5), ["a", "b", "c"])
    # the number of classes: the names, else the probabilities' width, else the largest label + 1
    assert classification_metrics([0, 1], [1, 0], class_names=["a", "b", "c", "d"])["class_names"] == \
        ["a", "b", "c", "d"]
    by_width = classification_metrics([0, 1], [1, 0], np.full((2, 4), 0.25))
    assert by_width["class_names"] == ["subtype 0", "subtype 1", "subtype 2", "subtype 3"]
    assert len(by_width["confusion_matrix"]) == 4 and len(by_width["calibration"]["bins"]) == 10
    assert classification_metrics([0, 2], [1, 0])["class_names"] == ["subtype 0", "subtype 1", "subtype 2"]
    assert len(classification_metrics([0, 1], [1, 0], np.full((2, 2), 0.5), n_bins=3)["calibration"]["bins"]) == 3
    # labels and probabilities as a CSV reader gives them (strings) mean the same numbers
    as_text = classification_metrics(["0", "1", "2", "2"], ["0", "2", "2", "1"],
                                     [["0.7", "0.2", "0.1"], ["0.1", "0.3", "0.6"], ["0.2", "0.2", "0.6"],
                                      ["0.3", "0.4", "0.3"]])
    as_numbers = classification_metrics([0, 1, 2, 2], [0, 2, 2, 1], [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6],
                                                                      [0.2, 0.2, 0.6], [0.3, 0.4, 0.3]])
    assert json.dumps(as_text) == json.dumps(as_numbers)
    assert as_numbers["n_cases"] == 4 and [c["name"] for c in as_numbers["per_class"]] == \
        ["subtype 0", "subtype 1", "subtype 2"]


def test_averages_count_every_declared_class_and_never_predicted_ones_as_zero():
    y_true, y_pred = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]  # subtype 2 present, never predicted; "d" never seen
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zero_division is explicit: no undefined-metric warnings
        result = classification_metrics(y_true, y_pred, class_names=["a", "b", "c", "d"])
    assert result["per_class"][2]["precision"] == 0.0 and result["per_class"][3]["f1"] == 0.0
    for average in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2, 3], average=average,
                                                         zero_division=0)
        assert (result[average]["precision"], result[average]["recall"], result[average]["f1"]) == \
            pytest.approx((p, r, f))
    assert result["macro"]["f1"] == pytest.approx((0.5 + 0.8 + 0 + 0) / 4)


def test_auc_is_undefined_for_a_class_that_is_all_or_nothing():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.5, 0.1, 0.4]])
    result = classification_metrics([0, 0, 0], [0, 0, 0], probabilities)
    assert result["auc_ovr"] == {"per_class": [None, None, None], "macro": None}
    assert result["accuracy"] == 1.0 and result["per_class"][0]["support"] == 3
    result = classification_metrics([0, 0, 1], [0, 0, 0], probabilities)
    assert result["auc_ovr"]["per_class"][:2] == pytest.approx([skm.roc_auc_score([1, 1, 0], [0.7, 0.6, 0.5]),
                                                               skm.roc_auc_score([0, 0, 1], [0.2, 0.3, 0.1])])
    assert result["auc_ovr"]["per_class"][2] is None
    assert result["auc_ovr"]["macro"] == pytest.approx(np.mean(result["auc_ovr"]["per_class"][:2]))
