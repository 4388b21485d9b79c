"""Checks of imported images and masks beyond what the reader (:mod:`nnunet_mtl.data.nifti`) proves.

Every check returns a list of problems (plain sentences, without the file name; the caller prefixes it) instead of
raising, so the importer can report every bad file of a dataset in one go.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nnunet_mtl.data.nifti import Geometry

# Real masks store 1 as 1.0000152587890625; anything further from an integer than this is a genuine error.
INTEGER_TOLERANCE = 1e-3
SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4
MAX_LISTED_VALUES = 5


def _list_values(values: np.ndarray) -> str:
    shown = ", ".join(repr(float(v)) if np.issubdtype(values.dtype, np.floating) else str(int(v))
                      for v in values[:MAX_LISTED_VALUES])
    more = f" and {len(values) - MAX_LISTED_VALUES} more" if len(values) > MAX_LISTED_VALUES else ""
    return shown + more


def geometry_problems(image: Geometry, mask: Geometry) -> list[str]:
    """Image and mask must share the voxel grid; small float noise in the header is tolerated."""
    problems = []
    if image.size != mask.size:
        problems.append(f"size {list(mask.size)} differs from the image's {list(image.size)}")
    if not np.allclose(mask.spacing, image.spacing, rtol=SPACING_RTOL, atol=0):
        problems.append(f"spacing {_fmt(mask.spacing)} differs from the image's {_fmt(image.spacing)}")
    if not np.allclose(mask.origin, image.origin, rtol=0, atol=ORIGIN_ATOL_MM):
        problems.append(f"origin {_fmt(mask.origin)} differs from the image's {_fmt(image.origin)}")
    if not np.allclose(mask.direction, image.direction, rtol=0, atol=DIRECTION_ATOL):
        problems.append(f"direction {_fmt(mask.direction)} differs from the image's {_fmt(image.direction)}")
    return problems


def _fmt(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v + 0.0:.6g}" for v in values) + "]"  # + 0.0: -0 prints as 0


@dataclass
class CleanMask:
    """Outcome of cleaning one mask: the uint8 array (None when the mask is unusable) and what was found."""

    array: np.ndarray | None
    problems: list[str] = field(default_factory=list)
    rounded: bool = False
    labels_present: set[int] = field(default_factory=set)


def clean_mask(array: np.ndarray, n_labels: int) -> CleanMask:
    """Turn a mask's voxels (a verified volume's array: 3D, finite) into uint8 labels 0..n_labels-1.

    Float masks whose values lie within INTEGER_TOLERANCE of an integer are rounded (the real data's quirk);
    any other value (fractional, negative, beyond the declared labels) is a problem naming the values.
    """
    problems: list[str] = []
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
