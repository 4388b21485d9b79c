"""The validation cases as another scanner or protocol would show them: what the head's temperature is fitted on.

A temperature fitted on a dozen validation cases of the training site says how sure the head may be *there*. Trained
on phantom site A, the head's wrong answers on sites B and C still came at a median probability of 0.89-0.92 (its
temperature, from 12 validation cases of which 11 were right, was 1), and the issue's other generator saw them at
0.97-0.99. Post-hoc calibration for domain drift (Tomani et al., CVPR 2021) fits the temperature on validation data
perturbed in the ways the deployment data may differ, so the probabilities stay honest when the data move.

For CT the ways are known from acquisition physics, not from any one test site: contrast timing scales every
enhancement together (arterial to late venous phase: enhancement x0.75-1.25 here), scanners disagree in HU calibration
by some 10-20 HU, a sharp reconstruction kernel adds noise (+15 HU SD), a smooth one blurs (1 mm), thick
reconstructions average neighbouring slices (3 mm slabs, partial volume of small lesions). :data:`ACQUISITION_SHIFTS`
is that list and one combination, each at two strengths; each validation case is predicted once per kind of shift
(the whole prediction, so the predicted lesion moves as it does on other data) and the head's logits are stored as
``validation_shifted`` records beside the fold's ``validation`` ones (training/subtype_fit.py fits on both).

Shifts work on nnU-Net's preprocessed grid: the CT-normalised image back in HU (the plans' foreground mean and SD),
shifted, clipped to the plans' 0.5-99.5 percentiles as nnU-Net's CT normalisation clips, normalised again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
from scipy import ndimage

SOFT_TISSUE_BASELINE_HU = 40.0  # unenhanced soft tissue: what contrast timing leaves alone
Shift = Callable[[np.ndarray, Sequence[float], np.random.Generator], np.ndarray]


def _enhancement(factor: float) -> Shift:
    """Contrast timing: every enhancement above unenhanced soft tissue scaled by ``factor``."""
    def shift(hu, spacing, rng):
        return hu + (factor - 1.0) * np.clip(hu - SOFT_TISSUE_BASELINE_HU, 0.0, None)
    return shift


def _offset(hu_offset: float) -> Shift:
    """HU calibration of another scanner."""
    return lambda hu, spacing, rng: hu + np.float32(hu_offset)


def _noise(sd_hu: float) -> Shift:
    """A sharper reconstruction kernel: more noise (white, ``sd_hu``)."""
    return lambda hu, spacing, rng: hu + rng.normal(0.0, sd_hu, hu.shape).astype(np.float32)


def _blur(fwhm_mm: float) -> Shift:
    """A smoother reconstruction kernel: in-plane Gaussian blur of ``fwhm_mm`` full width at half maximum."""
    def shift(hu, spacing, rng):
        sigma = [0.0] + [fwhm_mm / 2.355 / float(s) for s in spacing[1:]]
        return ndimage.gaussian_filter(hu, sigma, mode="nearest")
    return shift


def _thick_slices(slab_mm: float) -> Shift:
    """Thicker reconstruction: each slice the mean of a ``slab_mm`` slab (at least two slices), kept on its grid."""
    def shift(hu, spacing, rng):
        width = max(2, int(round(slab_mm / float(spacing[0]))))
        return ndimage.uniform_filter1d(hu, width, axis=0, mode="nearest")
    return shift


def _combined(*shifts: Shift) -> Shift:
    def shift(hu, spacing, rng):
        for one in shifts:
            hu = one(hu, spacing, rng)
        return hu
    return shift


# Each kind of shift at strength 1 (moderate, the physics above) or 2 (twice as far): calibration for drift fits
# one temperature over several strengths (Tomani et al.), so the head is neither sure on mild shifts nor lost on
# strong ones. Measured in docs/measurements-classification.md ("Confidence on other sites").
STRENGTHS = (1.0, 2.0)
ACQUISITION_SHIFTS: dict[str, Callable[[float], Shift]] = {
    "late_phase": lambda s: _enhancement(1.0 - 0.25 * s),
    "early_phase": lambda s: _enhancement(1.0 + 0.25 * s),
    "hu_offset_up": lambda s: _offset(15.0 * s),
    "hu_offset_down": lambda s: _offset(-15.0 * s),
    "sharp_kernel": lambda s: _noise(15.0 * s),
    "smooth_kernel": lambda s: _blur(1.0 * s),
    "thick_slices": lambda s: _thick_slices(3.0 * s),
    "late_phase_thick_noisy": lambda s: _combined(_enhancement(1.0 - 0.2 * s), _offset(10.0 * s),
                                                  _thick_slices(3.0 * s), _noise(10.0 * s)),
}


def shift_strength(case_index: int, kind_index: int) -> float:
    """Strengths alternate over cases and kinds: every case sees half its shifts moderate and half strong, every kind
    half its cases each way, at one prediction per case and kind."""
    return STRENGTHS[(case_index + kind_index) % len(STRENGTHS)]


def shifted_cases(data: np.ndarray, spacing_zyx: Sequence[float], intensity_properties: dict | None,
                  normalization_scheme: str, case_index: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """``(name@strength, shifted data)`` for each kind of acquisition shift of one preprocessed case (channels first;
    channel 0 is the CT), at the strength :func:`shift_strength` gives it; the noise is seeded by case and kind.
    Nothing for a channel that is not CT-normalised: its units are not HU."""
    if normalization_scheme != "CTNormalization" or not intensity_properties:
        return
    mean, sd = float(intensity_properties["mean"]), max(float(intensity_properties["std"]), 1e-8)
    low, high = float(intensity_properties["percentile_00_5"]), float(intensity_properties["percentile_99_5"])
    hu = np.asarray(data[0], np.float32) * sd + mean
    for k, (name, kind) in enumerate(ACQUISITION_SHIFTS.items()):
        strength = shift_strength(case_index, k)
        moved = np.clip(kind(strength)(hu, spacing_zyx, np.random.default_rng([case_index, k])), low, high)
        out = np.array(data, np.float32, copy=True)
        out[0] = (moved - mean) / sd
        yield f"{name}@{strength:g}", out
