"""The head's imperfect training attention (training/attention.py) against independent counts and blends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_mtl.training.attention import KEPT_FRACTION, cut_by_plane, imperfect_attention


def ball(shape=(12, 16, 16), centre=(6, 8, 8), radius=5.0) -> torch.Tensor:
    z, y, x = np.ogrid[tuple(slice(0, n) for n in shape)]
    inside = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius ** 2
    return torch.from_numpy(inside.astype(np.float32))


@pytest.mark.parametrize("kept_fraction", [0.3, 0.5, 0.9, 1.0])
def test_the_cut_keeps_the_asked_share_of_the_lesion_on_one_side_of_a_plane(kept_fraction):
    lesion = ball()
    generator = torch.Generator().manual_seed(3)
    cut = cut_by_plane(lesion, kept_fraction, generator)
    assert set(torch.unique(cut).tolist()) <= {0.0, 1.0}
    assert torch.all(cut <= lesion)  # never outside the true lesion
    assert int(cut.sum()) == round(kept_fraction * int(lesion.sum()))  # ties on the plane are measure zero here
    # one side of a plane: a linear classifier separates kept from cut-away voxels perfectly
    kept, dropped = torch.nonzero(cut > 0).numpy(), torch.nonzero((lesion - cut) > 0).numpy()
    if len(dropped):
        from sklearn.svm import LinearSVC

        points = np.concatenate([kept, dropped]).astype(float)
        labels = np.r_[np.ones(len(kept)), np.zeros(len(dropped))]
        svm = LinearSVC(C=1e4, max_iter=200_000).fit(points - points.mean(0), labels)
        assert svm.score(points - points.mean(0), labels) == 1.0


def test_an_empty_lesion_map_is_left_as_it_is():
    empty = torch.zeros(4, 6, 6)
    assert torch.equal(cut_by_plane(empty, 0.5), empty)


def test_share_zero_hands_back_the_true_attention_untouched():
    true = ball()[None, None].repeat(3, 1, 1, 1, 1)
    assert imperfect_attention(true, torch.rand_like(true), 0.0) is true


def test_every_chosen_patch_is_a_blend_of_a_cut_lesion_and_the_decoders_probability():
    """With share 1 each patch becomes w x cut + (1 - w) x predicted: recover w from a voxel the cut cannot reach
    (outside the lesion, where the true attention is 0) and check the rest of the patch against it."""
    true = ball()[None, None].repeat(4, 1, 1, 1, 1)
    predicted = torch.full_like(true, 0.25)
    predicted[..., 0, 0, 0] = 1.0
    out = imperfect_attention(true, predicted, 1.0, torch.Generator().manual_seed(0))
    lesion_voxels = int(true[0].sum())
    for b in range(len(out)):
        weight = 1 - float(out[b, 0, 0, 0, 0])  # outside the lesion: (1 - w) x 1.0
        cut = (out[b, 0] - (1 - weight) * predicted[b, 0]) / max(weight, 1e-6)
        if weight > 1e-3:
            assert torch.allclose(cut, cut.round(), atol=1e-3)  # the true part is binary
            share = float(cut.round().sum()) / lesion_voxels
            assert KEPT_FRACTION[0] - 0.01 <= share <= KEPT_FRACTION[1] + 0.01
            assert torch.all(cut.round() <= true[b, 0])


def test_only_about_the_asked_share_of_patches_is_changed():
    true = ball()[None, None].repeat(400, 1, 1, 1, 1)
    out = imperfect_attention(true, torch.zeros_like(true), 0.5, torch.Generator().manual_seed(1))
    changed = [not torch.equal(out[b], true[b]) for b in range(len(out))]
    assert 150 <= sum(changed) <= 250  # binomial(400, 0.5): 5 SD either side


def test_the_gland_channel_of_a_context_attention_is_blended_but_not_cut():
    gland = torch.ones(12, 16, 16) - ball()
    true = torch.stack([gland, ball()])[None]
    out = imperfect_attention(true, torch.zeros_like(true), 1.0, torch.Generator().manual_seed(2))
    # zero prediction: the gland channel is w x gland exactly, so its ratio to the true gland is one number
    ratio = out[0, 0][gland > 0] / gland[gland > 0]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))
