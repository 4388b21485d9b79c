"""Resampling at prediction time with nnU-Net's torch resampler, on the predictor's device.

nnU-Net's default plans resample with scikit-image / scipy splines (``resample_data_or_seg_to_shape``: the image at
order 3, the logits back to the original grid at order 1), single-threaded on the CPU. At the real crop size
(about 0.73 mm, millions of voxels) that is a large part of a case's non-network time (``bench/real_scale.py``,
stage ``profile``). nnU-Net 2.8.1 ships a torch resampler, ``resample_torch_fornnunet`` (its ``*_torchres``
planners use it), that interpolates with ``F.interpolate`` on any device and keeps nnU-Net's decision on resampling
the out-of-plane axis separately (``determine_do_sep_z_and_axis``, nearest along it as the default's ``order_z=0``).

:func:`prediction_configuration` gives the predictor a :class:`DeviceResamplingConfigurationManager` (a subclass of
nnU-Net's ``ConfigurationManager``) built from the model's own configuration with the resampling functions swapped
for the torch resampler; nnU-Net's preprocessing and export code call it as they call the plans' functions. The
plans file is not changed: the network was trained on data the plans' resampler prepared, and default mode keeps
it; fast mode takes the torch resampler (README: measured speed and the Dice between both resamplers' masks).
"""

from __future__ import annotations

from copy import deepcopy
from functools import partial

import torch
from nnunetv2.configuration import ANISO_THRESHOLD
from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

RESAMPLERS = ("plans", "torch")
_FUNCTIONS = ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities")


def torch_resampling(configuration: dict) -> dict:
    """A copy of a plans configuration whose three resampling functions are nnU-Net's torch resampler, keeping each
    one's separate-z choice (``force_separate_z``, anisotropy threshold) from the plans."""
    configuration = deepcopy(configuration)
    for key in _FUNCTIONS:
        planned = configuration.get(f"{key}_kwargs", {})
        configuration[key] = resample_torch_fornnunet.__name__
        configuration[f"{key}_kwargs"] = {
            "is_seg": key == "resampling_fn_seg",
            "force_separate_z": planned.get("force_separate_z"),
            "separate_z_anisotropy_threshold": planned.get("separate_z_anisotropy_threshold", ANISO_THRESHOLD),
            "memefficient_seg_resampling": False,
        }
    return configuration


class DeviceResamplingConfigurationManager(ConfigurationManager):
    """nnU-Net's ConfigurationManager whose torch resampling runs on ``device`` with ``num_threads`` CPU threads.

    Replaces the properties ``resampling_fn_data``, ``resampling_fn_seg`` and ``resampling_fn_probabilities``: the
    plans can name a function and its keyword arguments but not the device a prediction runs on. Functions other
    than the torch resampler are returned unchanged.
    """

    def __init__(self, configuration_dict: dict, device: torch.device, num_threads: int | None = None) -> None:
        super().__init__(configuration_dict)
        self.device = device
        self.num_threads = num_threads or torch.get_num_threads()

    def _on_device(self, fn: partial) -> partial:
        if fn.func is not resample_torch_fornnunet:
            return fn
        return partial(fn, device=self.device, num_threads=self.num_threads)

    @property
    def resampling_fn_data(self):
        return self._on_device(super().resampling_fn_data)

    @property
    def resampling_fn_seg(self):
        return self._on_device(super().resampling_fn_seg)

    @property
    def resampling_fn_probabilities(self):
        return self._on_device(super().resampling_fn_probabilities)


def prediction_configuration(configuration_manager: ConfigurationManager, resampler: str,
                             device: torch.device) -> ConfigurationManager:
    """The configuration a predictor uses: the plans' own (``plans``) or with nnU-Net's torch resampler on
    ``device`` (``torch``)."""
    if resampler not in RESAMPLERS:
        raise ValueError(f"unknown resampler {resampler!r}; choose one of {RESAMPLERS}")
    if resampler == "plans":
        return configuration_manager
    return DeviceResamplingConfigurationManager(torch_resampling(configuration_manager.configuration), device)
