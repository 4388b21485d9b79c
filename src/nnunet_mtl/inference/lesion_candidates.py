"""Predicted lesion components with a score each, and the table ``predict`` writes them to.

FROC curves and the lesion-presence AUC (``evaluation.lesions``) need a confidence per predicted lesion, and a mask
holds none. After the mask is final, every lesion component (26-connected, as everywhere in this project) gets the
largest and the mean softmax lesion probability inside it. The largest is the score: a component is as credible as
its most confident voxel, and a threshold on it removes whole components, which is what a reader sees. The voxel of
that largest probability (the *peak*) lies in the component, so evaluation finds the component again in the mask
without relying on a labelling order.

``lesion_candidates.csv`` (one row per lesion component of the written masks, a case without rows has no predicted
lesion)::

    Names,component,voxels,volume_ml,peak_z,peak_y,peak_x,max_probability,mean_probability,in_gland
    quiz_003.nii.gz,1,412,0.9102,14,60,71,0.998712,0.914803,1

``peak_z/y/x`` index the mask's voxel array in (z, y, x) order (``SimpleITK.GetArrayFromImage``); ``in_gland`` is 1
when the component lies in the largest foreground (label > 0) component, the gland.

The probabilities come from nnU-Net's own export (``convert_predicted_logits_to_segmentation_with_correct_shape``
with ``return_probabilities=True``): the softmax of the resampled logits, whose argmax is the mask, so no extra
network pass is needed.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from nnunet_mtl.evaluation.lesions import TOUCHING, label_components
from nnunet_mtl.inference.outputs import write_csv_atomic

CANDIDATES_CSV = "lesion_candidates.csv"
COLUMNS = ("Names", "component", "voxels", "volume_ml", "peak_z", "peak_y", "peak_x", "max_probability",
           "mean_probability", "in_gland")
MASK_ENDING = ".nii.gz"
LESION_LABEL = 2
# Columns added to subtype_probabilities.csv, so a reader can tell a subtype read off a found lesion from a guess.
LESION_COLUMNS = ("lesion_found", "lesion_volume_ml", "lesion_probability")


@dataclass(frozen=True)
class Candidate:
    component: int  # 1..n in scipy's raster labelling order of the mask's lesion components
    voxels: int
    volume_ml: float
    peak: tuple[int, int, int]  # (z, y, x) voxel of the largest lesion probability
    max_probability: float
    mean_probability: float
    in_gland: bool

    @property
    def score(self) -> float:
        return self.max_probability


def gland_mask(segmentation: np.ndarray) -> np.ndarray:
    """The largest foreground (label > 0) component, 26-connected: where the pancreas is."""
    labels, n = ndimage.label(segmentation > 0, TOUCHING)
    if n == 0:
        return np.zeros(segmentation.shape, bool)
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


def find_candidates(segmentation: np.ndarray, lesion_probability: np.ndarray, spacing_zyx: Sequence[float],
                    lesion_label: int = LESION_LABEL) -> tuple[np.ndarray, list[Candidate]]:
    """(component labels, one candidate per lesion component) of a final mask and its lesion probability map."""
    segmentation = np.asarray(segmentation)
    lesion_probability = np.asarray(lesion_probability, dtype=np.float32)
    if lesion_probability.shape != segmentation.shape:
        raise ValueError(f"lesion probability {lesion_probability.shape} and mask {segmentation.shape} differ")
    labels, n = label_components(segmentation == lesion_label)
    if n == 0:
        return labels, []
    index = np.arange(1, n + 1)
    voxels = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    maxima = ndimage.maximum(lesion_probability, labels, index)
    means = ndimage.mean(lesion_probability, labels, index)
    peaks = ndimage.maximum_position(lesion_probability, labels, index)
    gland = gland_mask(segmentation)
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    candidates = [Candidate(int(i), int(v), float(v * voxel_ml), tuple(int(c) for c in peak), float(mx), float(mn),
                            bool(gland[tuple(peak)]))
                  for i, v, peak, mx, mn in zip(index, voxels, peaks, maxima, means)]
    return labels, candidates


def lesion_facts(candidates: Sequence[Candidate]) -> dict[str, object]:
    """The case's lesion columns for subtype_probabilities.csv: found (0/1), total volume (ml), largest score."""
    return {"lesion_found": int(bool(candidates)),
            # each component's volume as lesion_candidates.csv stores it (6 decimals), so a case kept from an earlier
            # run (its components read back from the table) gets the very number it got when it was predicted
            "lesion_volume_ml": round(sum(round(c.volume_ml, 6) for c in candidates), 4),
            "lesion_probability": round(max((c.max_probability for c in candidates), default=0.0), 6)}


def write_candidates_table(out_dir: Path, candidates: Mapping[str, Sequence[Candidate]]) -> None:
    """Rewrite the whole table (temporary name, then rename), cases sorted, so it always lists finished cases."""
    rows = [[f"{case}{MASK_ENDING}", c.component, c.voxels, f"{c.volume_ml:.6f}", *c.peak, f"{c.max_probability:.6f}",
             f"{c.mean_probability:.6f}", int(c.in_gland)] for case in sorted(candidates) for c in candidates[case]]
    write_csv_atomic(Path(out_dir) / CANDIDATES_CSV, [COLUMNS, *rows])


def read_candidates_table(path: Path) -> dict[str, list[Candidate]]:
    """Candidates per case id from a table; a malformed row raises ValueError naming the file and line."""
    path = Path(path)
    table: dict[str, list[Candidate]] = {}
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != COLUMNS:
            raise ValueError(f"{path}: header is {','.join(header or [])!r}, expected {','.join(COLUMNS)!r}")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                if len(row) != len(COLUMNS):
                    raise ValueError(f"{len(row)} fields instead of {len(COLUMNS)}")
                case = row[0].strip().removesuffix(MASK_ENDING)
                candidate = Candidate(int(row[1]), int(row[2]), float(row[3]), (int(row[4]), int(row[5]), int(row[6])),
                                      float(row[7]), float(row[8]), bool(int(row[9])))
                if not all(np.isfinite([candidate.volume_ml, candidate.max_probability, candidate.mean_probability])):
                    raise ValueError("non-finite number")
            except ValueError as e:
                raise ValueError(f"{path} line {line}: {e}") from None
            table.setdefault(case, []).append(candidate)
    return table
