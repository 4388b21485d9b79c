"""Prediction-time resampling with nnU-Net's torch resampler against the plans' own (scikit-image) resampler."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from scipy import ndimage

from nnunet_mtl.inference.resampling import (
    DeviceResamplingConfigurationManager,
    prediction_configuration,
    torch_resampling,
)

CPU = torch.device("cpu")
# nnU-Net's default planner's choices, as written in its plans
PLANNED = {"resampling_fn_data": "resample_data_or_seg_to_shape",
           "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
           "resampling_fn_seg": "resample_data_or_seg_to_shape",
           "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
           "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
           "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                  "force_separate_z": None},
           "architecture": {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []}}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_torch_configuration_swaps_the_functions_and_keeps_the_separate_z_choice():
    configuration = torch_resampling({**PLANNED, "resampling_fn_data_kwargs": {
        **PLANNED["resampling_fn_data_kwargs"], "force_separate_z": True}})
    assert {configuration[k] for k in ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities")} \
        == {"resample_torch_fornnunet"}
    assert configuration["resampling_fn_data_kwargs"]["force_separate_z"] is True
    assert configuration["resampling_fn_probabilities_kwargs"]["force_separate_z"] is None
    assert configuration["resampling_fn_seg_kwargs"]["is_seg"] and not configuration[
        "resampling_fn_data_kwargs"]["is_seg"]
    assert PLANNED["resampling_fn_data"] == "resample_data_or_seg_to_shape"  # the plans themselves are untouched

    manager = prediction_configuration(ConfigurationManager(PLANNED), "torch", CPU)
    assert isinstance(manager, DeviceResamplingConfigurationManager)
    fn = manager.resampling_fn_probabilities
    assert fn.func is resample_torch_fornnunet and fn.keywords["device"] == CPU and fn.keywords["num_threads"] >= 1
    plans = prediction_configuration(ConfigurationManager(PLANNED), "plans", CPU)
    assert plans.resampling_fn_data.func is resample_data_or_seg_to_shape
    assert "device" not in DeviceResamplingConfigurationManager(PLANNED, CPU).resampling_fn_data.keywords
    with pytest.raises(ValueError, match="unknown resampler"):
        prediction_configuration(ConfigurationManager(PLANNED), "cubic", CPU)


def phantom_labels(shape=(24, 90, 100)) -> np.ndarray:
    """An ellipsoidal gland with a lesion inside, smooth boundaries (what a network's argmax looks like)."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    gland = ((z - 12) / 9) ** 2 + ((y - 45) / 30) ** 2 + ((x - 50) / 38) ** 2 <= 1
    lesion = ((z - 12) / 5) ** 2 + ((y - 40) / 9) ** 2 + ((x - 60) / 10) ** 2 <= 1
    return (gland.astype(np.uint8) + (gland & lesion)).astype(np.uint8)


@pytest.mark.parametrize("spacing, target", [((2.0, 0.8, 0.8), (2.0, 0.73, 0.73)),  # in-plane only
                                             ((2.5, 0.66, 0.66), (2.0, 0.73, 0.73))])  # separate z (ratio > 3)
def test_both_resamplers_export_nearly_the_same_masks(spacing, target):
    """The export path: logits on the network's grid back to the image grid, by either resampler, then argmax."""
    truth = phantom_labels()
    shape = truth.shape
    network_shape = [int(round(s * a / b)) for s, a, b in zip(shape, spacing, target)]
    # logits on the network grid: a smoothed one-hot map of the truth brought there with nearest neighbours
    zoomed = ndimage.zoom(truth, [n / s for n, s in zip(network_shape, shape)], order=0)
    logits = np.stack([ndimage.gaussian_filter((zoomed == k).astype(np.float32), 1.0) for k in range(3)])
    masks = {}
    for name, fn in (("plans", partial(resample_data_or_seg_to_shape, **PLANNED[
            "resampling_fn_probabilities_kwargs"])), ("torch", DeviceResamplingConfigurationManager(
                torch_resampling(PLANNED), CPU).resampling_fn_probabilities)):
        back = fn(torch.from_numpy(logits.copy()), shape, target, spacing)
        masks[name] = np.asarray(back).argmax(0)
        assert masks[name].shape == shape
    assert dice(masks["torch"] > 0, masks["plans"] > 0) > 0.99
    assert dice(masks["torch"] == 2, masks["plans"] == 2) > 0.98
    assert dice(masks["torch"] > 0, truth > 0) > 0.95  # both stay close to the truth they came from


def test_both_resamplers_prepare_nearly_the_same_image():
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.normal(size=(20, 80, 90)).astype(np.float32), 2.0)[None]
    image /= image.std()
    shape, spacing, target = (20, 88, 99), (2.0, 0.8, 0.8), (2.0, 0.73, 0.73)
    plans = resample_data_or_seg_to_shape(image, shape, spacing, target, **PLANNED["resampling_fn_data_kwargs"])
    ours = DeviceResamplingConfigurationManager(torch_resampling(PLANNED), CPU).resampling_fn_data(
        image, shape, spacing, target)
    assert ours.shape == plans.shape == (1, *shape)
    assert np.corrcoef(ours.ravel(), plans.ravel())[0, 1] > 0.99
