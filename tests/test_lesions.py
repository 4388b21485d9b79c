"""Lesion-wise matching against an independent brute-force implementation on hand-made and random components.

The reference below labels components by flood fill over Python sets (no scipy), computes IoU by set operations and
applies the documented rule pair by pair; FROC points are recomputed by removing components below each threshold
and matching again from scratch.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from nnunet_mtl.evaluation.lesions import (
    FRAGMENT_SHARE,
    froc,
    label_components,
    match_case,
    presence_auc,
    sensitivity_at_fp,
    sensitivity_by_size,
    summarise,
)

SPACING = (2.0, 1.0, 1.0)  # one voxel = 0.002 ml
NEIGHBOURS = [d for d in itertools.product((-1, 0, 1), repeat=3) if d != (0, 0, 0)]


# ---------------------------------------------------------------- the independent reference

def flood_components(mask: np.ndarray) -> list[frozenset]:
    """26-connected components as sets of voxel tuples, by breadth-first flood fill."""
    remaining = {tuple(int(v) for v in p) for p in np.argwhere(mask)}
    components = []
    while remaining:
        seed = remaining.pop()
        component, frontier = {seed}, [seed]
        while frontier:
            z, y, x = frontier.pop()
            for dz, dy, dx in NEIGHBOURS:
                n = (z + dz, y + dy, x + dx)
                if n in remaining:
                    remaining.remove(n)
                    component.add(n)
                    frontier.append(n)
        components.append(frozenset(component))
    return components


def brute_force(pred: np.ndarray, truth: np.ndarray, scores: dict | None = None, iou_threshold: float = 0.1,
                keep=lambda component: True):
    """(detected sizes with Dice and detection score, false-positive sizes with score, fragment count)."""
    truth_components = flood_components(truth == 2)
    pred_components = [c for c in flood_components(pred == 2) if keep(c)]
    lesion_voxels = set().union(*truth_components) if truth_components else set()
    detected, missed = [], []
    for t in truth_components:
        hits = [p for p in pred_components if len(t & p) / len(t | p) > iou_threshold]
        if hits:
            union = set().union(*hits)
            score = max(scores[p] for p in hits) if scores else None
            detected.append((len(t), round(2 * len(t & union) / (len(t) + len(union)), 9), score))
        else:
            missed.append(len(t))
    false, fragments = [], 0
    for p in pred_components:
        if any(len(t & p) / len(t | p) > iou_threshold for t in truth_components):
            continue
        if len(p & lesion_voxels) / len(p) > FRAGMENT_SHARE:
            fragments += 1
        else:
            false.append((len(p), scores[p] if scores else None))
    return sorted(detected), sorted(missed), sorted(false), fragments


def ours(result):
    detected = sorted((t.voxels, round(t.dice, 9), t.detection_score) for t in result.truth if t.detected)
    missed = sorted(t.voxels for t in result.truth if not t.detected)
    false = sorted((p.voxels, p.score) for p in result.predicted if p.false_positive)
    return detected, missed, false, sum(p.fragment for p in result.predicted)


def random_case(rng: np.random.Generator, shape=(8, 14, 14)) -> tuple[np.ndarray, np.ndarray]:
    """Truth: a few boxes of lesion in a gland; prediction: shifted / shrunk / grown copies, specks, merges."""
    truth = np.zeros(shape, np.uint8)
    truth[1:-1, 2:-2, 2:-2] = 1
    pred = truth.copy()
    z, y, x = rng.integers(0, np.array(shape) - (3, 4, 7))
    if rng.random() < 0.3:  # two lesions one voxel apart, predicted as one blob
        truth[z:z + 3, y:y + 3, x:x + 3] = truth[z:z + 3, y:y + 3, x + 4:x + 7] = 2
        pred[z:z + 3, y:y + 3, x:x + 7] = 2
    elif rng.random() < 0.4:  # one lesion predicted in two pieces
        truth[z:z + 3, y:y + 4, x:x + 7] = 2
        pred[z:z + 3, y:y + 4, x:x + 3] = pred[z:z + 3, y:y + 4, x + 4:x + 7] = 2
    for _ in range(rng.integers(0, 4)):
        low = rng.integers(0, np.array(shape) - 2)
        size = rng.integers(1, 5, 3)
        box = tuple(slice(lo, lo + s) for lo, s in zip(low, size))
        truth[box] = 2
        if rng.random() < 0.75:
            shift = rng.integers(-2, 3, 3)
            grow = rng.integers(-1, 3, 3)
            pbox = tuple(slice(max(lo + d, 0), max(lo + d + max(s + g, 1), 0)) for lo, s, d, g in
                         zip(low, size, shift, grow))
            pred[pbox] = 2
    if rng.random() < 0.3:  # grow the predicted lesions by a voxel: neighbours merge into one blob
        from scipy.ndimage import binary_dilation

        pred[binary_dilation(pred == 2, np.ones((3, 3, 3), bool))] = 2
    if rng.random() < 0.3:  # cut them by a two-voxel slab: a lesion predicted in pieces
        x = rng.integers(2, shape[2] - 3)
        pred[..., x:x + 2][pred[..., x:x + 2] == 2] = 1
    specks = rng.random(shape) < 0.003  # single voxels, some touching others only at a corner
    pred[specks] = 2
    return pred, truth


def score_map(pred: np.ndarray, rng: np.random.Generator) -> tuple[list, dict]:
    """A random score per predicted component: as (voxel, score) points for ours, by voxel set for the reference."""
    points, by_set = [], {}
    for component in flood_components(pred == 2):
        score = float(rng.choice([0.4, 0.5, 0.6, 0.7, 0.8, 0.9]))  # ties between components on purpose
        points.append((min(component), score))
        by_set[component] = score
    return points, by_set


# ---------------------------------------------------------------- tests

def test_components_are_26_connected_like_the_flood_fill():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((6, 9, 9)) < 0.15
        labels, n = label_components(mask)
        reference = flood_components(mask)
        assert n == len(reference)
        assert sorted(int((labels == i).sum()) for i in range(1, n + 1)) == sorted(len(c) for c in reference)
    corner = np.zeros((3, 3, 3), bool)
    corner[0, 0, 0] = corner[1, 1, 1] = True  # touching only at a corner: one component
    assert label_components(corner)[1] == 1


def test_matching_agrees_with_brute_force_on_random_cases():
    rng = np.random.default_rng(1)
    seen = {"missed": 0, "false": 0, "fragments": 0, "multi": 0}
    for _ in range(150):
        pred, truth = random_case(rng)
        points, by_set = score_map(pred, rng)
        for iou_threshold in (0.1, 0.3):
            result = match_case(pred, truth, SPACING, score_points=points, iou_threshold=iou_threshold)
            expected = brute_force(pred, truth, by_set, iou_threshold)
            assert ours(result) == expected
        seen["missed"] += len(expected[1])
        seen["false"] += len(expected[2])
        seen["fragments"] += expected[3]
        seen["multi"] += sum(len(t.matched) > 1 for t in result.truth) + sum(len(p.matched) > 1
                                                                              for p in result.predicted)
    assert all(v > 0 for v in seen.values()), seen  # the random cases really exercise every branch


def test_one_to_many_in_both_directions():
    truth = np.zeros((6, 20, 20), np.uint8)
    pred = np.zeros_like(truth)
    truth[1:5, 2:6, 2:5] = 2  # lesion A (48 voxels)
    truth[1:5, 2:6, 6:9] = 2  # lesion B (48 voxels), one column apart
    pred[1:5, 2:6, 2:9] = 2  # one blob over both (112 voxels): matches A and B (IoU 48 / 112 each)
    truth[1:5, 10:18, 10:18] = 2  # lesion C (256 voxels)
    pred[1:5, 10:18, 10:13] = 2  # C predicted in two pieces, 96 voxels each, IoU 0.375 each
    pred[1:5, 10:18, 15:18] = 2
    result = match_case(pred, truth, SPACING)
    assert [t.detected for t in result.truth] == [True, True, True]
    assert sorted(len(t.matched) for t in result.truth) == [1, 1, 2]
    assert sorted(len(p.matched) for p in result.predicted) == [1, 1, 2]
    assert not any(p.false_positive for p in result.predicted)
    c = next(t for t in result.truth if t.voxels == 256)
    assert c.dice == pytest.approx(2 * 192 / (256 + 192))
    a = next(t for t in result.truth if t.voxels == 48 and t.centre[2] < 4)
    assert a.dice == pytest.approx(2 * 48 / (48 + 112))  # the merged blob counts whole against each lesion


def test_fragment_false_positive_and_locations():
    truth = np.zeros((8, 30, 30), np.uint8)
    truth[1:7, 5:25, 5:25] = 1  # the gland
    truth[2:6, 8:18, 8:18] = 2  # a 400-voxel lesion
    pred = truth.copy()
    pred[pred == 2] = 1
    pred[3, 9, 9] = 2  # one voxel inside the lesion: IoU 1/400, a fragment, not a false lesion
    pred[3, 20, 20] = 2  # inside the gland, away from the lesion
    pred[5, 10:12, 24:26] = 2  # straddles the gland's edge, 2 of 4 voxels in: inside (half counts)
    pred[3, 24, 24:27] = 2  # 1 of 3 voxels in: border
    pred[1, 25:27, 10] = 2  # just outside, touching the gland at a face: border
    pred[3, 28, 2] = 2  # far outside
    result = match_case(pred, truth, SPACING)
    assert not result.truth[0].detected
    fragments = [p for p in result.predicted if p.fragment]
    assert len(fragments) == 1 and fragments[0].voxels == 1
    locations = sorted((p.voxels, p.location) for p in result.predicted if p.false_positive)
    assert locations == [(1, "inside"), (1, "outside"), (2, "border"), (3, "border"), (4, "inside")]
    summary = summarise([result])
    assert summary["false_positives"]["by_location"] == {"inside": 2, "border": 2, "outside": 1}
    assert summary["n_fragments"] == 1 and summary["false_positives"]["per_case"] == 5


def test_froc_points_match_brute_force_thresholding():
    rng = np.random.default_rng(2)
    cases, references = [], []
    for i in range(30):
        pred, truth = random_case(rng)
        points, by_set = score_map(pred, rng)
        cases.append(match_case(pred, truth, SPACING, case=f"c{i}", score_points=points))
        references.append((pred, truth, by_set))
    curve = froc(cases)
    n_truth = sum(len(c.truth) for c in cases)
    assert curve["thresholds"][0] is None and curve["sensitivity"][0] == 0 and curve["fp_per_case"][0] == 0
    assert curve["thresholds"][1:] == sorted(curve["thresholds"][1:], reverse=True)
    for threshold, sensitivity, fp in zip(curve["thresholds"][1:], curve["sensitivity"][1:],
                                          curve["fp_per_case"][1:]):
        found = false = 0
        for pred, truth, by_set in references:
            detected, _, falses, _ = brute_force(pred, truth, by_set,
                                                 keep=lambda c, s=by_set, t=threshold: s[c] >= t)
            found += len(detected)
            false += len(falses)
        assert sensitivity == pytest.approx(found / n_truth)
        assert fp == pytest.approx(false / len(cases))
    # the lowest threshold keeps every component: the unthresholded counts
    summary = summarise(cases)
    assert curve["sensitivity"][-1] == pytest.approx(summary["sensitivity"])
    assert curve["fp_per_case"][-1] == pytest.approx(summary["false_positives"]["per_case"])
    point = sensitivity_at_fp(curve, 0.3)
    allowed = [s for s, f in zip(curve["sensitivity"], curve["fp_per_case"]) if f <= 0.3]
    assert point["sensitivity"] == max(allowed) and point["fp_per_case"] <= 0.3


def test_sensitivity_by_size_bins_and_minimum_volume():
    truth = np.zeros((10, 40, 40), np.uint8)
    pred = np.zeros_like(truth)
    sizes = {(0, 0): 20, (0, 20): 120, (20, 0): 700, (20, 20): 3000}  # voxels: 0.04, 0.24, 1.4, 6 ml
    for (y, x), voxels in sizes.items():
        flat = np.zeros(10 * 18 * 18, bool)
        flat[:voxels] = True
        truth[:, y:y + 18, x:x + 18][flat.reshape(10, 18, 18)] = 2
    pred[(truth == 2) & (np.arange(40)[None, :, None] >= 20)] = 2  # find the two lower-right lesions only
    result = match_case(pred, truth, SPACING)
    rows = sensitivity_by_size(result.truth)
    assert [(r["total"], r["detected"]) for r in rows] == [(1, 0), (1, 0), (1, 1), (1, 1)]
    assert [r["bin"] for r in rows] == ["< 0.2 ml", "0.2-1 ml", "1-5 ml", ">= 5 ml"]
    custom = sensitivity_by_size(result.truth, (0.1, 2.0))
    assert [(r["total"], r["detected"]) for r in custom] == [(1, 0), (2, 1), (1, 1)]
    summary = summarise([result], min_volume_ml=0.1)
    assert summary["sensitivity_min_volume"]["total"] == 3
    assert summary["sensitivity_min_volume"]["detected"] == 2
    assert summary["froc"] is None and summary["presence_auc"] is None  # no scores recorded
    with pytest.raises(ValueError):
        sensitivity_by_size(result.truth, (1.0, 0.5))


def test_presence_auc_is_the_pairwise_ranking_probability():
    rng = np.random.default_rng(3)
    cases, labels, scores = [], [], []
    for i in range(40):
        truth = np.zeros((4, 8, 8), np.uint8)
        pred = np.zeros_like(truth)
        has_lesion = i % 3 != 0
        if has_lesion:
            truth[1:3, 2:5, 2:5] = 2
        score = None
        if rng.random() < 0.8:
            pred[1:3, 2:5, 2:5] = 2
            score = float(rng.uniform(0.35, 1.0) if has_lesion else rng.uniform(0.34, 0.8))
        points = [((1, 2, 2), score)] if score is not None else []
        cases.append(match_case(pred, truth, SPACING, case=str(i), score_points=points))
        labels.append(has_lesion)
        scores.append(score or 0.0)
    wins = [1.0 if p > n else 0.5 if p == n else 0.0 for p, lp in zip(scores, labels) if lp
            for n, ln in zip(scores, labels) if not ln]
    assert presence_auc(cases) == pytest.approx(sum(wins) / len(wins))
    assert presence_auc([c for c, lab in zip(cases, labels) if lab]) is None  # every case has a lesion


def test_scores_must_fit_the_mask():
    truth = np.zeros((4, 8, 8), np.uint8)
    pred = truth.copy()
    pred[1, 1, 1] = pred[2, 5, 5] = 2
    with pytest.raises(ValueError, match="no score"):
        match_case(pred, truth, SPACING, score_points=[((1, 1, 1), 0.9)])
    with pytest.raises(ValueError, match="not a predicted lesion voxel"):
        match_case(pred, truth, SPACING, score_points=[((1, 1, 1), 0.9), ((0, 0, 0), 0.5)])
    result = match_case(pred, truth, SPACING, score_points=[((1, 1, 1), 0.9), ((2, 5, 5), 0.5), ((1, 1, 1), 0.95)])
    assert sorted(p.score for p in result.predicted) == [0.5, 0.95]
    assert result.presence_score == 0.95
