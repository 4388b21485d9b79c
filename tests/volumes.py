"""The tests' one NIfTI writer and the hand-made volumes several test files share (label maps, a synthetic
prediction set). A helper module, not a conftest: test files import it by name."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SPACING_ZYX = (2.0, 0.7, 0.7)
SHAPE = (16, 48, 64)


def write_volume(path: Path, array: np.ndarray, spacing: Sequence[float] | None = None,
                 origin: Sequence[float] | None = None, direction: Sequence[float] | None = None,
                 spacing_zyx: Sequence[float] | None = None, reference: sitk.Image | None = None) -> Path:
    """Write ``array`` (z, y, x order, as SimpleITK returns arrays) to ``path``, creating its folder.

    Geometry in SimpleITK's (x, y, z) order (``spacing``, ``origin``, ``direction``), or ``spacing_zyx`` in the
    array's order, or copied from ``reference``; only for 3D arrays (2D and 4D test inputs get none).
    """
    image = sitk.GetImageFromArray(np.asarray(array), isVector=False)
    if reference is not None:
        image.CopyInformation(reference)
    if spacing_zyx is not None:
        spacing = tuple(reversed(spacing_zyx))
    if image.GetDimension() == 3:
        for value, setter in ((spacing, image.SetSpacing), (origin, image.SetOrigin),
                              (direction, image.SetDirection)):
            if value is not None:
                setter(tuple(float(v) for v in value))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def read_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def ellipsoid(shape: tuple[int, int, int], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + \
        ((x - centre[2]) / radii[2]) ** 2 <= 1.0


def label_map(shape, centre, pancreas_radii, lesion_centre, lesion_radii) -> np.ndarray:
    labels = ellipsoid(shape, centre, pancreas_radii).astype(np.uint8)
    if lesion_radii is not None:
        labels[ellipsoid(shape, lesion_centre, lesion_radii) & (labels > 0)] = 2
    return labels


def ct_image(labels: np.ndarray, subtype: int, rng: np.random.Generator) -> np.ndarray:
    """int16 CT-like crop: fat background, a vessel, enhancing pancreas, a lesion whose density depends on subtype."""
    ct = np.full(labels.shape, -90.0)
    ct[ellipsoid(labels.shape, (labels.shape[0] / 2, 8, 10), (99, 5, 5))] = 180.0
    ct[labels == 1] = 60.0
    ct[labels == 2] = (10.0, 0.0, 130.0)[subtype % 3]
    return (ct + rng.normal(0, 12, labels.shape)).astype(np.int16)


def make_synthetic_set(root: Path, n_cases: int = 6, seed: int = 0, probabilities: bool = True,
                       shape=SHAPE) -> dict[str, Path]:
    """Truth masks + subtype CSV, predictions (shifted, some lesions missed), images; with ``probabilities`` also
    subtype probabilities and predict's lesion_candidates.csv (a false lesion speck in every third case, a lesion
    score per component); returns the folders."""
    from nnunet_mtl.inference.lesion_candidates import find_candidates, write_candidates_table

    rng = np.random.default_rng(seed)
    score_rng = np.random.default_rng(seed + 1000)  # its own stream: the masks stay those of earlier versions
    candidates = {}
    folders = {name: root / name for name in ("truth", "pred", "images")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    truth_rows, pred_rows, prob_rows = [], [], []
    for i in range(n_cases):
        case = f"quiz_{i:03d}"
        subtype = i % 3
        centre = (shape[0] / 2 + rng.uniform(-1, 1), shape[1] / 2 + rng.uniform(-2, 2), shape[2] / 2)
        radii = (shape[0] * 0.3, shape[1] * 0.25, shape[2] * 0.35)
        lesion_centre = (centre[0], centre[1], centre[2] + radii[2] * 0.4)
        lesion_radii = (radii[0] * 0.6, radii[1] * 0.5, radii[2] * 0.3)
        truth = label_map(shape, centre, radii, lesion_centre, lesion_radii)
        shift = (0, rng.integers(0, 3), rng.integers(-2, 3))
        pred_lesion = None if i % 4 == 3 else tuple(r * rng.uniform(0.6, 1.2) for r in lesion_radii)
        pred = label_map(shape, tuple(c + s for c, s in zip(centre, shift)), radii,
                         tuple(c + s for c, s in zip(lesion_centre, shift)), pred_lesion)
        if probabilities and i % 3 == 1:
            pred[1, 2, 2:4] = 2  # a false lesion in a corner, away from the gland
        lesion_probability = np.where(pred == 2, score_rng.uniform(0.4, 1.0, pred.shape), 0.05)
        candidates[case] = find_candidates(pred, lesion_probability, SPACING_ZYX)[1]
        write_volume(folders["truth"] / f"{case}.nii.gz", truth, spacing_zyx=SPACING_ZYX)
        write_volume(folders["pred"] / f"{case}.nii.gz", pred, spacing_zyx=SPACING_ZYX)
        write_volume(folders["images"] / f"{case}_0000.nii.gz", ct_image(truth, subtype, rng), spacing_zyx=SPACING_ZYX)
        predicted = subtype if i % 5 != 4 else (subtype + 1) % 3
        logits = rng.normal(0, 1, 3)
        logits[predicted] += 2.5
        p = np.exp(logits) / np.exp(logits).sum()
        truth_rows.append([f"{case}.nii.gz", subtype])
        pred_rows.append([f"{case}.nii.gz", predicted])
        prob_rows.append([f"{case}.nii.gz", predicted, *p.round(6)])
    write_csv(folders["truth"] / "subtype_results.csv", ["Names", "Subtype"], truth_rows)
    write_csv(folders["pred"] / "subtype_results.csv", ["Names", "Subtype"], pred_rows)
    if probabilities:
        write_csv(folders["pred"] / "subtype_probabilities.csv", ["Names", "Subtype", "prob_0", "prob_1", "prob_2"],
                  prob_rows)
        write_candidates_table(folders["pred"], candidates)
    return folders


def crop_phantom_test_images(tiny_dataset: dict[str, Path], folder: Path, size_xyz=(48, 48, 20)) -> list[str]:
    """The tiny dataset's phantom test images cropped around their pancreas (a few tiles of the tiny model, so a
    case predicts in a fraction of a second), written to ``folder`` as ``<case>_0000.nii.gz``; returns the cases."""
    phantom = tiny_dataset["phantom"]
    folder.mkdir(parents=True, exist_ok=True)
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (phantom / "test").glob("*_0000.nii.gz"))
    for case in cases:
        image = sitk.ReadImage(str(phantom / "test" / f"{case}_0000.nii.gz"))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom / "test_groundtruth" / f"{case}.nii.gz")))
        centre = np.argwhere(truth > 0).mean(0)[::-1].astype(int)  # x, y, z
        size = np.array(image.GetSize())
        lo = np.clip(centre - np.array(size_xyz) // 2, 0, size - size_xyz)
        crop = image[int(lo[0]):int(lo[0]) + size_xyz[0], int(lo[1]):int(lo[1]) + size_xyz[1],
                     int(lo[2]):int(lo[2]) + size_xyz[2]]
        sitk.WriteImage(crop, str(folder / f"{case}_0000.nii.gz"), True)
    return cases
