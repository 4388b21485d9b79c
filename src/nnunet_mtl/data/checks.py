"""Per-file checks for imported NIfTI images and masks.

Every check returns a list of problems (plain sentences, without the file name; the caller prefixes it) instead of
raising, so the importer can report every bad file of a dataset in one go.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

# Real masks store 1 as 1.0000152587890625; anything further from an integer than this is a genuine error.
INTEGER_TOLERANCE = 1e-3
SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4
MAX_LISTED_VALUES = 5


def read_nifti(path: Path) -> tuple[sitk.Image | None, list[str]]:
    """Read a file with SimpleITK; an unreadable file becomes a problem, not an exception."""
    try:
        return sitk.ReadImage(str(path)), []
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        return None, [f"not a readable NIfTI file ({reason})"]


def check_shape(image: sitk.Image, what: str) -> list[str]:
    """Images and masks must be 3D with one channel (nnU-Net reads further channels from further files)."""
    problems = []
    if image.GetDimension() != 3:
        problems.append(f"{what} is {image.GetDimension()}D (size {list(image.GetSize())}), expected 3D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        problems.append(f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel, expected a "
                        "single channel")
    return problems


def _list_values(values: np.ndarray) -> str:
    shown = ", ".join(repr(float(v)) if np.issubdtype(values.dtype, np.floating) else str(int(v))
                      for v in values[:MAX_LISTED_VALUES])
    more = f" and {len(values) - MAX_LISTED_VALUES} more" if len(values) > MAX_LISTED_VALUES else ""
    return shown + more


def check_finite(image: sitk.Image, path: Path, what: str) -> list[str]:
    """NaN and inf voxels of a float file.

    ITK's NIfTI reader silently turns them into 0, so the stored values are read once more with nibabel.
    """
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return []
    data = np.asanyarray(nib.load(str(path)).dataobj)
    bad = ~np.isfinite(data)
    if not bad.any():
        return []
    kinds = sorted({"NaN" if np.isnan(v) else repr(float(v)) for v in np.unique(data[bad])})
    return [f"{what} holds {int(bad.sum())} non-finite voxels ({', '.join(kinds)})"]


def geometry_problems(image: sitk.Image, mask: sitk.Image) -> list[str]:
    """Image and mask must share the voxel grid; small float noise in the header is tolerated."""
    problems = []
    if image.GetSize() != mask.GetSize():
        problems.append(f"size {list(mask.GetSize())} differs from the image's {list(image.GetSize())}")
    if not np.allclose(mask.GetSpacing(), image.GetSpacing(), rtol=SPACING_RTOL, atol=0):
        problems.append(f"spacing {_fmt(mask.GetSpacing())} differs from the image's {_fmt(image.GetSpacing())}")
    if not np.allclose(mask.GetOrigin(), image.GetOrigin(), rtol=0, atol=ORIGIN_ATOL_MM):
        problems.append(f"origin {_fmt(mask.GetOrigin())} differs from the image's {_fmt(image.GetOrigin())}")
    if not np.allclose(mask.GetDirection(), image.GetDirection(), rtol=0, atol=DIRECTION_ATOL):
        problems.append(f"direction {_fmt(mask.GetDirection())} differs from the image's "
                        f"{_fmt(image.GetDirection())}")
    return problems


def _fmt(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


@dataclass
class CleanMask:
    """Outcome of cleaning one mask: the uint8 array (None when the mask is unusable) and what was found."""

    array: np.ndarray | None
    problems: list[str] = field(default_factory=list)
    rounded: bool = False
    labels_present: set[int] = field(default_factory=set)


def clean_mask(mask: sitk.Image, n_labels: int) -> CleanMask:
    """Turn a mask into uint8 labels 0..n_labels-1.

    Float masks whose values lie within INTEGER_TOLERANCE of an integer are rounded (the real data's quirk);
    any other value (fractional, negative, beyond the declared labels) is a problem naming the values. NaN never
    reaches here (ITK reads it as 0): see :func:`check_finite`.
    """
    problems = check_shape(mask, "mask")
    if problems:
        return CleanMask(None, problems)
    array = sitk.GetArrayFromImage(mask)
    values = np.unique(array)
    rounded = False
    if np.issubdtype(array.dtype, np.floating):
        error = np.abs(values - np.rint(values))
        fractional = values[error > INTEGER_TOLERANCE]
        if len(fractional):
            problems.append(f"mask holds non-integer values ({_list_values(fractional)}); values within "
                            f"{INTEGER_TOLERANCE} of an integer are rounded, these are not")
        rounded = bool((error > 0).any())
        values = np.unique(np.rint(values[error <= INTEGER_TOLERANCE])).astype(np.int64)
    negative = values[values < 0]
    if len(negative):
        problems.append(f"mask holds negative values ({_list_values(negative)})")
    too_high = values[values >= n_labels]
    if len(too_high):
        problems.append(f"mask holds labels {_list_values(too_high)} outside the declared labels 0..{n_labels - 1}")
    if problems:
        return CleanMask(None, problems)
    labels = np.rint(array).astype(np.uint8) if rounded else array.astype(np.uint8)
    return CleanMask(labels, [], rounded, {int(v) for v in values})
