"""Intensity augmentation for scanner and protocol shift, added to nnU-Net's training transforms.

nnU-Net's own intensity augmentation is mild (brightness and contrast x0.75-1.25 in 15 % of patches, noise in 10 %)
because it is tuned for data from one source. CT from another hospital differs in exactly those directions: contrast
timing scales every enhancement together, scanners disagree in HU calibration by a few to tens of HU, and sharp
reconstruction kernels add noise. The ``scanner`` setting draws these more often and further, on the z-scored image
(nnU-Net's CT normalisation divides by the dataset's foreground SD, some 40-80 HU), so that what the network learns
is the lesion's contrast with its surroundings more than the absolute HU one site happens to give it.
"""

from __future__ import annotations

from batchgeneratorsv2.transforms.intensity.brightness import (
    BrightnessAdditiveTransform,
    MultiplicativeBrightnessTransform,
)
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform

INTENSITY_AUGMENTATIONS = ("nnunet", "scanner")

# In units of the normalised image (one foreground SD). Probabilities per patch.
ENHANCEMENT_SCALE = (0.7, 1.3)  # contrast timing: arterial to late venous
ENHANCEMENT_PROBABILITY = 0.5
CALIBRATION_SD = 0.3  # HU offset between scanners: about 10-25 HU
CALIBRATION_PROBABILITY = 0.5
NOISE_VARIANCE = (0.0, 0.2)  # a sharp kernel's extra noise: SD up to 0.45
NOISE_PROBABILITY = 0.3


def scanner_shift_transforms() -> list[RandomTransform]:
    """The three scanner/protocol changes, each applied to a patch with its own probability."""
    return [
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast(ENHANCEMENT_SCALE),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=ENHANCEMENT_PROBABILITY),
        RandomTransform(BrightnessAdditiveTransform(mu=0.0, sigma=CALIBRATION_SD, synchronize_channels=False,
                                                    p_per_channel=1),
                        apply_probability=CALIBRATION_PROBABILITY),
        RandomTransform(GaussianNoiseTransform(noise_variance=NOISE_VARIANCE, p_per_channel=1,
                                               synchronize_channels=True),
                        apply_probability=NOISE_PROBABILITY),
    ]


def with_intensity_augmentation(transforms: ComposeTransforms, kind: str) -> ComposeTransforms:
    """nnU-Net's training transforms, with the scanner-shift transforms right after the spatial transform (before
    nnU-Net's own intensity transforms, as a scanner acts before any later processing) when ``kind`` is
    ``scanner``; unchanged for ``nnunet``."""
    if kind not in INTENSITY_AUGMENTATIONS:
        raise ValueError(f"intensity augmentation {kind!r}: expected one of {', '.join(INTENSITY_AUGMENTATIONS)}")
    if kind == "nnunet":
        return transforms
    steps = list(transforms.transforms)
    spatial = next((i for i, t in enumerate(steps) if isinstance(t, SpatialTransform)), None)
    if spatial is None:
        raise ValueError("nnU-Net's training transforms hold no SpatialTransform: cannot place the scanner shift")
    # nnU-Net's 2D-in-3D augmentation wraps the spatial transform in a conversion pair: insert after the pair
    position = spatial + 1
    if position < len(steps) and isinstance(steps[position], Convert2DTo3DTransform):
        position += 1
    return ComposeTransforms(steps[:position] + scanner_shift_transforms() + steps[position:])
