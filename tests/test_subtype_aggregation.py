"""The case's subtype from per-tile records: aggregation over tiles and folds, and which lesion decides. Pure
functions on hand-made inputs (no model), fast enough for mutation testing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_mtl.inference.predictor import TileRecord, aggregate_subtype_logits, lesion_centre


def softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def test_mean_aggregation_averages_logits():
    records = [TileRecord(torch.tensor([2.0, 0.0, 0.0]), 0.0), TileRecord(torch.tensor([0.0, 4.0, 0.0]), 50.0)]
    assert np.allclose(aggregate_subtype_logits(records, "mean"), softmax(np.array([1.0, 2.0, 0.0])))


def test_lesion_weighted_aggregation_follows_the_lesion_tiles():
    records = [TileRecord(torch.tensor([3.0, 0.0, 0.0]), 0.0), TileRecord(torch.tensor([0.0, 0.0, 3.0]), 30.0),
               TileRecord(torch.tensor([0.0, 3.0, 0.0]), 10.0)]
    expected = softmax((np.array([0, 0, 3.0]) * 30 + np.array([0, 3.0, 0]) * 10) / 40)
    assert np.allclose(aggregate_subtype_logits(records, "lesion_weighted"), expected)
    # no lesion anywhere: falls back to the plain mean
    no_lesion = [TileRecord(r.logits, 0.0) for r in records]
    assert np.allclose(aggregate_subtype_logits(no_lesion, "lesion_weighted"),
                       aggregate_subtype_logits(no_lesion, "mean"))


def test_folds_count_equally_whatever_their_number_of_records():
    lesion_patch = TileRecord(torch.tensor([0.0, 0.0, 4.0]), 30.0, fold=0)  # a fold that found the lesion
    no_lesion = [TileRecord(torch.tensor([2.0, 0.0, 0.0]), 0.0, fold=1) for _ in range(5)]  # one that did not
    expected = softmax((np.array([0.0, 0.0, 4.0]) + np.array([2.0, 0.0, 0.0])) / 2)
    for method in ("lesion_tile", "lesion_weighted"):
        assert np.allclose(aggregate_subtype_logits([lesion_patch, *no_lesion], method), expected)


def test_lesion_centre_picks_the_lesion_in_the_gland_over_a_larger_one_outside():
    labels = np.zeros((12, 40, 40), np.uint8)
    labels[3:9, 5:20, 5:20] = 1  # the gland
    labels[5:8, 10:13, 10:13] = 2  # its lesion: 27 voxels
    labels[2:9, 28:35, 28:35] = 2  # a larger false lesion away from it: 343 voxels, the largest component
    assert lesion_centre(labels, 2).tolist() == [6, 11, 11]
    labels[labels == 1] = 0
    labels[0:12, 0:3, 0:40] = 1  # the largest foreground component holds no lesion: the largest lesion anywhere
    assert lesion_centre(labels, 2).tolist() == [5, 31, 31]
    gland = np.ones((8, 16, 8), np.uint8)
    gland[1:4, 1:4, 1:4] = 2  # 27 voxels and 27 more touching them only corner to corner: one lesion of 54
    gland[4:7, 4:7, 4:7] = 2  # voxels, as nnU-Net's largest-component postprocessing counts (26-connectivity)
    gland[1:5, 9:15, 1:3] = 2  # 48 voxels: the largest under 6-connectivity
    assert lesion_centre(gland, 2).tolist() == [4, 4, 4]
    assert lesion_centre(np.ones((4, 4, 4), np.uint8), 2) is None




def test_aggregation_refuses_nothing_and_unknown_methods():
    with pytest.raises(ValueError, match="^no tiles were predicted$"):
        aggregate_subtype_logits([], "mean")
    with pytest.raises(ValueError, match=r"^unknown aggregation 'median'; choose one of \('lesion_tile', "
                                         r"'lesion_weighted', 'mean'\)$"):
        aggregate_subtype_logits([TileRecord(torch.zeros(3), 0.0)], "median")


def test_one_lesion_voxel_is_enough_to_weight_the_tiles():
    """Weights follow the lesion from a single predicted voxel on; below that, the plain mean."""
    records = [TileRecord(torch.tensor([4.0, 0.0, 0.0]), 0.0), TileRecord(torch.tensor([0.0, 0.0, 4.0]), 1.0)]
    assert np.allclose(aggregate_subtype_logits(records, "lesion_weighted"), softmax(np.array([0.0, 0.0, 4.0])))
    assert np.allclose(aggregate_subtype_logits(records, "lesion_tile"), softmax(np.array([0.0, 0.0, 4.0])))
    half = [TileRecord(records[0].logits, 0.0), TileRecord(records[1].logits, 0.5)]
    assert np.allclose(aggregate_subtype_logits(half, "lesion_weighted"), softmax(np.array([2.0, 0.0, 2.0])))
    assert np.allclose(aggregate_subtype_logits(records, "mean"), softmax(np.array([2.0, 0.0, 2.0])))
    default = aggregate_subtype_logits(records)  # lesion-weighted unless asked otherwise
    assert np.allclose(default, softmax(np.array([0.0, 0.0, 4.0]))) and default.dtype == np.float32


def test_lesion_centre_rounds_to_the_nearest_voxel_and_ignores_other_labels():
    labels = np.zeros((9, 9, 9), np.uint8)
    labels[1:8, 1:8, 1:8] = 1
    labels[2:4, 2:5, 5:7] = 2  # centre (2.5, 3, 5.5): numpy rounds half to even
    assert lesion_centre(labels, 2).tolist() == [2, 3, 6]
    labels[6, 6, 6] = 3  # another label is not the lesion
    assert lesion_centre(labels, 2).tolist() == [2, 3, 6]
    assert lesion_centre(labels, 3).tolist() == [6, 6, 6]
    assert lesion_centre(labels, 2).dtype.kind == "i"  # voxel indices, usable as slice bounds
    assert lesion_centre(np.zeros((4, 4, 4), np.uint8), 2) is None


def test_the_gland_is_found_with_26_connectivity_and_its_largest_lesion_wins():
    """Two gland parts touching only at a corner are one gland (100 + 80 voxels), larger than a 150-voxel blob
    whose own lesion is the largest anywhere; under 6-connectivity the blob would be the largest component. Inside
    the gland the larger lesion wins although a smaller one comes first in the volume."""
    labels = np.zeros((12, 30, 30), np.uint8)
    labels[0:4, 0:5, 0:5] = 1  # part A: 100 voxels
    labels[4:9, 5:9, 5:9] = 1  # part B: 80 voxels, touching A only at the corner (3, 4, 4) - (4, 5, 5)
    labels[0:1, 0:2, 0:2] = 2  # a 4-voxel lesion in A, first in the volume
    labels[5:7, 6:8, 6:8] = 2  # an 8-voxel lesion in B
    labels[0:6, 15:20, 15:20] = 1  # the blob: 150 voxels
    labels[1:4, 16:19, 16:19] = 2  # its 27-voxel lesion
    assert lesion_centre(labels, 2).tolist() == [6, 6, 6]  # centre of B's lesion (5.5 -> 6, 6.5 -> 6)
