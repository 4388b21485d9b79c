"""Hand-made features of the predicted lesion: IBSI radiomics (MIRP) of the lesion and of a shell around it.

Why: the CNN head learned its subtype cues on one phantom generator and named the subtype of found lesions wrongly
at p = 0.99 on another; a regularised linear model on standard radiomics of the *predicted* lesion is the other
opinion the product fuses with it. Attenuation is what separates the subtypes (solid hypodense, near-water cystic,
hyper-enhancing), and a scanner's contrast timing moves absolute HU by tens of HU, so the features include the
lesion's contrast against the parenchyma around it (a shell, the pancreas within ``SHELL_MM`` of the lesion), which
such a shift moves far less, and its ratios to that parenchyma (``relative.*``), which a scaling of enhancement does
not move at all.

Features are computed on nnU-Net's preprocessed grid (the model's target spacing, the same for every site) from the
image converted back to HU (nnU-Net's CT normalisation inverted; values stay clipped to the planned foreground
percentiles), so training and prediction see the same thing. MIRP (IBSI-compliant, pure Python) computes them;
PyRadiomics does not install without a compiler. Families: first-order statistics, intensity histogram (25 HU bins),
grey-level run-length and size-zone matrices (3D). GLCM and the neighbourhood families cost several times more per
lesion and were left out.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

LESION_FAMILIES = ("statistics", "intensity_histogram", "glrlm", "glszm")
SHELL_FAMILIES = ("statistics",)
BIN_WIDTH_HU = 25.0
SHELL_MM = 4.0
MIN_SHELL_VOXELS = 20
CROP_MARGIN_VOXELS = 3
# first-order statistics whose lesion-minus-shell difference is a feature of its own
CONTRAST_STATISTICS = ("stat_mean", "stat_median", "stat_p10", "stat_p90")
# Below this shell mean (HU) the shell is not enhancing parenchyma, and ratios to it mean nothing (NaN, imputed).
MIN_SHELL_HU_FOR_RATIOS = 20.0
# What the subtype classifier's feature model may use (`train --feature-set`): every feature, or only those that
# describe the lesion against its own scan's parenchyma (the relative ratios, and the shape of its HU histogram).
FEATURE_SETS = {"all": (), "relative": ("relative.", "lesion.stat_skew", "lesion.stat_kurt")}
TOUCHING = np.ones((3, 3, 3), bool)  # 26-connectivity, as nnU-Net's largest-component postprocessing


def select_lesion(labels: np.ndarray, lesion_label: int = 2) -> np.ndarray | None:
    """The lesion to describe: the largest lesion component inside the largest foreground component.

    The lesion lies in the pancreas. A false lesion in a bowel loop or vessel away from the gland can be larger than
    the true one (measured on a demo model: quiz_104's subtype came from a 2723-voxel blob outside the gland, not
    from its 2492-voxel lesion), and the keep-largest-component postprocessing drops it from the mask anyway. Falls
    back to the largest lesion component anywhere; None without a predicted lesion.
    """
    lesion = labels == lesion_label
    if not lesion.any():
        return None
    touching = np.ones((3,) * labels.ndim, bool)
    foreground, _ = ndimage.label(labels > 0, touching)
    largest_foreground = np.argmax(np.bincount(foreground.ravel())[1:]) + 1
    in_gland = lesion & (foreground == largest_foreground)
    components, _ = ndimage.label(in_gland if in_gland.any() else lesion, touching)
    largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
    return components == largest


def shell_around(lesion: np.ndarray, labels: np.ndarray, spacing_zyx: Sequence[float],
                 shell_mm: float = SHELL_MM, organ_label: int = 1) -> np.ndarray:
    """Voxels within ``shell_mm`` of the lesion, outside it: the organ's tissue there when there is enough of it
    (the lesion's contrast against its own parenchyma), else the whole ring."""
    radius = [max(1, int(round(shell_mm / s))) for s in spacing_zyx]
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    ball = sum((g * s / shell_mm) ** 2 for g, s in zip(grids, spacing_zyx)) <= 1.0
    # dilate within the lesion's bounding box grown by the radius (the same ring; a whole crop costs 10x more)
    box = _crop(lesion, margin=max(radius) + 1)
    ring = np.zeros_like(lesion)
    ring[box] = ndimage.binary_dilation(lesion[box], structure=ball) & ~lesion[box]
    organ = ring & (labels == organ_label)
    return organ if organ.sum() >= MIN_SHELL_VOXELS else ring


def _mirp_features(image: np.ndarray, mask: np.ndarray, spacing_zyx: Sequence[float],
                   families: Sequence[str]) -> dict[str, float]:
    from mirp import extract_features

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MIRP warns about tiny regions and pandas internals; NaN is handled below
        logging.disable(logging.INFO)
        try:
            tables = extract_features(
                image=image.astype(np.float32), mask=mask.astype(np.uint8), image_modality="CT",
                image_voxel_spacing=tuple(float(s) for s in spacing_zyx), base_feature_families=list(families),
                base_discretisation_method="fixed_bin_size", base_discretisation_bin_width=BIN_WIDTH_HU,
                resegmentation_intensity_range=[-1000.0, 3071.0])
        finally:
            logging.disable(logging.NOTSET)
    table = tables[0]
    prefixes = ("stat_", "ih_", "rlm_", "szm_", "cm_", "dzm_", "ngt_", "ngl_", "morph_")
    return {c: float(table[c].iloc[0]) for c in table.columns if c.startswith(prefixes)}


def _crop(*masks: np.ndarray, margin: int = CROP_MARGIN_VOXELS) -> tuple[slice, ...]:
    union = np.logical_or.reduce(masks)
    idx = np.argwhere(union)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, union.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def lesion_features(image_hu: np.ndarray, labels: np.ndarray, spacing_zyx: Sequence[float],
                    lesion_label: int = 2) -> dict[str, float] | None:
    """Features of the predicted lesion (see the module docstring); None when no lesion is predicted.

    Names: ``lesion.<mirp name>``, ``shell.<mirp name>``, ``contrast.<statistic>`` (lesion minus shell) and
    ``lesion.log_volume_ml``. Values may be NaN (texture of a lesion of a few voxels); the classifier imputes them.
    """
    lesion = select_lesion(labels, lesion_label)
    if lesion is None:
        return None
    shell = shell_around(lesion, labels, spacing_zyx)
    window = _crop(lesion, shell)
    image, lesion_w, shell_w = image_hu[window], lesion[window], shell[window]
    features = {f"lesion.{k}": v for k, v in _mirp_features(image, lesion_w, spacing_zyx, LESION_FAMILIES).items()}
    shell_stats = _mirp_features(image, shell_w, spacing_zyx, SHELL_FAMILIES) if shell_w.any() else {}
    features.update({f"shell.{k}": v for k, v in shell_stats.items()})
    for name in CONTRAST_STATISTICS:
        features[f"contrast.{name}"] = features.get(f"lesion.{name}", math.nan) - shell_stats.get(name, math.nan)
    volume_ml = float(lesion.sum()) * float(np.prod(spacing_zyx)) / 1000.0
    features["lesion.log_volume_ml"] = math.log(volume_ml)
    features.update(relative_features(features))
    return features


def relative_features(features: dict[str, float]) -> dict[str, float]:
    """The lesion described relative to the parenchyma around it on the same scan, from its first-order statistics.

    Why: contrast timing scales enhancement (lesion and parenchyma alike) and a kernel changes the noise, so
    absolute HU and SD learned at one site mislead at another. On true lesion masks of the bench's phantom sites
    (bench/subtype_ceiling.py), a model on every feature fitted at site A falls from macro-F1 0.95 in site to 0.78 at
    site B, though B's own cases separate at 0.95. Ratios to the shell's mean remove a multiplicative enhancement
    change, the SD ratio a noise change. Names ``relative.*``; NaN where the shell is missing or not enhancing.
    """
    shell_mean = features.get("shell.stat_mean", math.nan)
    shell_var = features.get("shell.stat_var", math.nan)
    usable = math.isfinite(shell_mean) and shell_mean >= MIN_SHELL_HU_FOR_RATIOS
    ratio = (lambda value: value / shell_mean) if usable else (lambda value: math.nan)
    lesion_sd = math.sqrt(max(features.get("lesion.stat_var", math.nan), 0.0))
    shell_sd = math.sqrt(shell_var) if math.isfinite(shell_var) and shell_var > 0 else math.nan
    return {"relative.mean_contrast": ratio(features["lesion.stat_mean"] - shell_mean),
            "relative.p10": ratio(features["lesion.stat_p10"]),
            "relative.p90": ratio(features["lesion.stat_p90"]),
            "relative.sd_ratio": lesion_sd / shell_sd if math.isfinite(shell_sd) else math.nan}


def image_in_hu(data: np.ndarray, normalization_scheme: str, intensity_properties: dict | None) -> np.ndarray:
    """nnU-Net's normalised channel back in HU: its CT normalisation is clip, then (x - mean) / std, with the
    dataset's foreground statistics from the plans; other schemes are left as they are (features in their units)."""
    if normalization_scheme != "CTNormalization" or not intensity_properties:
        return data.astype(np.float32)
    return (data * max(float(intensity_properties["std"]), 1e-8) + float(intensity_properties["mean"])).astype(
        np.float32)


def select_features(features: dict[str, float], feature_set: str) -> dict[str, float]:
    """The features of one of FEATURE_SETS; records written before the ``relative.*`` features existed get them
    derived from their stored statistics."""
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {feature_set!r}; choose one of {sorted(FEATURE_SETS)}")
    if "relative.mean_contrast" not in features and "lesion.stat_mean" in features:
        features = {**features, **relative_features(features)}
    prefixes = FEATURE_SETS[feature_set]
    return {k: v for k, v in features.items() if k.startswith(prefixes)} if prefixes else dict(features)
