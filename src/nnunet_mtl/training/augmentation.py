"""Intensity augmentation for scanner and protocol shift, added to nnU-Net's training transforms.

nnU-Net's own intensity augmentation is mild (brightness and contrast x0.75-1.25 in 15 % of patches, noise in 10 %)
because it is tuned for data from one source. CT from another hospital differs in exactly those directions: contrast
timing scales every enhancement together, scanners disagree in HU calibration by a few to tens of HU, and sharp
reconstruction kernels add noise. The ``scanner`` setting draws these more often and further, on the z-scored image
(nnU-Net's CT normalisation divides by the dataset's foreground SD, some 40-80 HU), so that what the network learns
is the lesion's contrast with its surroundings more than the absolute HU one site happens to give it.

Slice thickness is the other shift a second hospital brings: a 3 mm reconstruction averages a small lesion with the
parenchyma above and below it (partial volume), so it looks smaller and less contrasted than on the 1.5-2 mm slices
a model was trained on. ``--thick-slices MM`` (see :class:`ThickSliceTransform`) shows training patches as if
reconstructed at up to MM mm along z.

The lesion's own contrast is the third: contrast timing and the lesion's biology set how far its mean lies from the
parenchyma's, and a model trained on one site learns that distance. On phantom site B, hyper-enhancing lesions
15-50 HU brighter than the gland were found 6 times in 21, while site A's stood 55-115 HU out (measured in
docs/measurements-lesions.md). ``--lesion-contrast-aug yes`` (see :class:`LesionContrastTransform`) moves each
training lesion's mean towards or away from its surrounding gland, keeping its texture and noise. Off by default:
it found more of those lesions in three trainings of three, but added about 0.3 false lesions per case. A moved
lesion no longer shows the contrast that names its subtype, so the subtype loss skips the patches it moved
(:class:`MovedLesionLog`). Before that, two trainings with it named the subtypes of true lesions at 0.74-0.80 macro-F1,
one without it at 0.85 (docs/measurements-classification.md, bench/head_on_true_masks.py).
"""

from __future__ import annotations

import torch
from batchgeneratorsv2.transforms.base.basic_transform import ImageOnlyTransform
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
THICK_SLICE_PROBABILITY = 0.5
LESION_CONTRAST_RANGE = (0.35, 1.1)  # factor on the lesion's mean contrast with the gland: dimmer, slightly brighter
LESION_CONTRAST_PROBABILITY = 0.5
LESION_LABEL, GLAND_LABEL = 2, 1
RING_VOXELS = 3  # the gland within this many voxels of the lesion is its reference
MIN_REFERENCE_VOXELS = 20


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


class ThickSliceTransform(ImageOnlyTransform):
    """A thicker reconstructed slice along z (the patch's first axis): each channel is averaged over slabs of
    ``factor`` voxels, drawn in [1, max_factor) per patch, as a scanner integrates over its slice profile, then
    brought back to the patch's grid the way nnU-Net's preprocessing resamples a thick-slice scan: linearly, or, in
    half the patches, by nearest neighbour along z (what nnU-Net does to scans whose slices are over 3x their pixel
    size, e.g. 3 mm slices at 0.8 mm pixels: the slices repeat). In-plane detail and the labels are left as they
    are: the truth of a thick-slice scan is still the anatomy. (batchgeneratorsv2's SimulateLowResolutionTransform
    with ``ignore_axes`` would sample slices (nearest neighbour) instead of averaging them, and returns linearly
    only.)"""

    def __init__(self, max_factor: float) -> None:
        super().__init__()
        if max_factor <= 1:
            raise ValueError(f"thick-slice factor {max_factor}: must exceed 1 (1 is the training spacing itself)")
        self.max_factor = max_factor

    def get_parameters(self, **data_dict) -> dict:
        return {"factor": 1 + (self.max_factor - 1) * torch.rand(1).item(), "nearest": torch.rand(1).item() < 0.5}

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        depth = img.shape[1]
        slabs = max(1, round(depth / params["factor"]))
        if slabs >= depth:
            return img
        thick = torch.nn.functional.interpolate(img[None].float(), size=(slabs, *img.shape[2:]), mode="area")
        if params["nearest"]:
            back = torch.nn.functional.interpolate(thick, size=tuple(img.shape[1:]), mode="nearest-exact")
        else:
            back = torch.nn.functional.interpolate(thick, size=tuple(img.shape[1:]), mode="trilinear",
                                                   align_corners=False)
        return back[0].to(img.dtype)


class LesionContrastTransform(ImageOnlyTransform):
    """Scale a lesion's mean contrast with the gland around it by a factor drawn in ``factor_range``.

    The reference is the mean of the gland voxels (label 1) within ``RING_VOXELS`` of the lesion (label 2), or of
    the whole gland in the patch when that ring is too small; every channel's lesion voxels are shifted by
    ``(factor - 1) * (lesion mean - reference)``, so texture, noise and the lesion's inner structure (cyst walls,
    locules) stay as they are and only the level moves. The shift fades over one voxel outside the lesion (a 3x3x3
    mean of the lesion mask), where partial volume mixes lesion and gland. Labels are unchanged. Patches without a
    lesion or without enough gland are left alone. Placed after nnU-Net's spatial transform, so the segmentation is
    the patch's own, on the patch's grid."""

    def __init__(self, factor_range: tuple[float, float] = LESION_CONTRAST_RANGE) -> None:
        super().__init__()
        low, high = factor_range
        if not 0 <= low <= high:
            raise ValueError(f"lesion contrast factors {factor_range}: expected 0 <= low <= high")
        self.factor_range = (float(low), float(high))

    def get_parameters(self, **data_dict) -> dict:
        factor = self.factor_range[0] + (self.factor_range[1] - self.factor_range[0]) * torch.rand(1).item()
        image, segmentation = data_dict.get("image"), data_dict.get("segmentation")
        if image is None or segmentation is None or segmentation.ndim != 4:  # 3D patches only (after the spatial step)
            return {"shift": None}
        labels = segmentation[0]
        lesion = labels == LESION_LABEL
        if not bool(lesion.any()):
            return {"shift": None}
        gland = labels == GLAND_LABEL
        near = torch.nn.functional.max_pool3d(lesion[None].float(), 2 * RING_VOXELS + 1, stride=1,
                                              padding=RING_VOXELS)[0] > 0
        reference = near & gland
        if int(reference.sum()) < MIN_REFERENCE_VOXELS:
            reference = gland
        if int(reference.sum()) < MIN_REFERENCE_VOXELS:
            return {"shift": None}
        fade = torch.nn.functional.avg_pool3d(lesion[None].float(), 3, stride=1, padding=1, count_include_pad=False)[0]
        weight = torch.where(lesion, torch.ones_like(fade), fade)
        contrast = torch.stack([channel[lesion].float().mean() - channel[reference].float().mean()
                                for channel in image])
        shift = (factor - 1.0) * contrast.view(-1, 1, 1, 1) * weight[None]
        return {"shift": shift}

    moved = False  # set when this transform last moved a lesion; read and reset by MovedLesionLog

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        shift = params["shift"]
        self.moved = self.moved or shift is not None
        return img if shift is None else (img + shift).to(img.dtype)


def _walk(transform) -> list:
    """Every transform inside ``transform`` (ComposeTransforms' list, RandomTransform's wrapped one)."""
    found = [transform]
    for inner in getattr(transform, "transforms", None) or []:
        found += _walk(inner)
    if getattr(transform, "transform", None) is not None:
        found += _walk(transform.transform)
    return found


class MovedLesionLog:
    """nnU-Net's per-patch training transforms, noting for each patch whether its lesion's contrast was moved.

    nnU-Net's loader calls the transforms once per patch, in batch order, and keeps only the image and segmentation
    they return; this wrapper is called in their place and appends one flag per call to ``moved``, which the loader
    turns into the batch's ``subtype_counts`` (0 for a moved patch: its lesion's contrast says nothing true of its
    subtype)."""

    def __init__(self, transforms) -> None:
        self.transforms = transforms
        self.movers = [t for t in _walk(transforms) if isinstance(t, LesionContrastTransform)]
        self.moved: list[bool] = []

    def __call__(self, **data_dict):
        for mover in self.movers:
            mover.moved = False
        out = self.transforms(**data_dict)
        self.moved.append(any(mover.moved for mover in self.movers))
        return out


def _insert_after_spatial(transforms: ComposeTransforms, added: list) -> ComposeTransforms:
    """nnU-Net's transforms with ``added`` right after the spatial transform (after the 2D-in-3D conversion pair
    that wraps it for anisotropic data), before nnU-Net's own intensity transforms, as a scanner acts before any
    later processing."""
    steps = list(transforms.transforms)
    spatial = next((i for i, t in enumerate(steps) if isinstance(t, SpatialTransform)), None)
    if spatial is None:
        raise ValueError("nnU-Net's training transforms hold no SpatialTransform: "
                         "cannot place a scanner-side augmentation")
    position = spatial + 1
    if position < len(steps) and isinstance(steps[position], Convert2DTo3DTransform):
        position += 1
    return ComposeTransforms(steps[:position] + added + steps[position:])


def with_intensity_augmentation(transforms: ComposeTransforms, kind: str) -> ComposeTransforms:
    """nnU-Net's training transforms, with the scanner-shift transforms after the spatial transform when ``kind``
    is ``scanner``; unchanged for ``nnunet``."""
    if kind not in INTENSITY_AUGMENTATIONS:
        raise ValueError(f"intensity augmentation {kind!r}: expected one of {', '.join(INTENSITY_AUGMENTATIONS)}")
    if kind == "nnunet":
        return transforms
    return _insert_after_spatial(transforms, scanner_shift_transforms())


def with_thick_slices(transforms: ComposeTransforms, thickness_mm: float, spacing_z_mm: float) -> ComposeTransforms:
    """nnU-Net's training transforms with :class:`ThickSliceTransform` after the spatial transform, in
    ``THICK_SLICE_PROBABILITY`` of the patches, simulating slices up to ``thickness_mm`` thick on a grid of
    ``spacing_z_mm``; unchanged when ``thickness_mm`` is 0 or not thicker than the grid."""
    if thickness_mm < 0:
        raise ValueError(f"thick-slice augmentation {thickness_mm} mm: must be 0 (off) or positive")
    if thickness_mm <= spacing_z_mm:
        return transforms
    thick = RandomTransform(ThickSliceTransform(thickness_mm / spacing_z_mm), apply_probability=THICK_SLICE_PROBABILITY)
    return _insert_after_spatial(transforms, [thick])


def with_lesion_contrast(transforms: ComposeTransforms, enabled: bool) -> ComposeTransforms | MovedLesionLog:
    """nnU-Net's training transforms with :class:`LesionContrastTransform` after the spatial transform, in
    ``LESION_CONTRAST_PROBABILITY`` of the patches, logging which patches it moved; unchanged when not
    ``enabled``."""
    if not enabled:
        return transforms
    contrast = RandomTransform(LesionContrastTransform(), apply_probability=LESION_CONTRAST_PROBABILITY)
    return MovedLesionLog(_insert_after_spatial(transforms, [contrast]))
