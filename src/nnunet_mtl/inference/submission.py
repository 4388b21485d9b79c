"""The task's submission zip (all masks at the zip root plus ``subtype_results.csv``) and its validator.

Both read every mask through the verified reader (:mod:`nnunet_mtl.data.nifti`): a mask cut short, damaged or not
NIfTI is never packed or called valid. Masks must hold integer labels stored as uint8, as nnU-Net writes them (the
task's masks are labels; validators of the task reject float masks).
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from nnunet_mtl.data.nifti import NiftiError, read_geometry, read_volume
from nnunet_mtl.inference.outputs import MASK_ENDING, SUBTYPE_CSV
from nnunet_mtl.inference.parts import gather_parts
from nnunet_mtl.inference.predict import IMAGE_SUFFIX
from nnunet_mtl.paths import make_dirs
from nnunet_mtl.tempfiles import remove_stale, temp_path

HEADER = ["Names", "Subtype"]
GEOMETRY_TOLERANCE = 1e-4


class SubmissionError(ValueError):
    """A prediction folder that cannot be packed; the message lists every problem with its file."""


def pack_submission(prediction_dir: Path, zip_path: Path, num_subtypes: int = 3) -> list[str]:
    """Zip every mask and the subtype table, flat, after checking them (each mask whole, a uint8 label map; the
    table listing exactly these masks); returns the case ids packed.

    A folder predicted in parts is gathered first (refused with :class:`~nnunet_mtl.inference.parts.IncompleteParts`
    unless every part is there and finished)."""
    gather_parts(prediction_dir)
    table = prediction_dir / SUBTYPE_CSV
    if not table.is_file():
        raise FileNotFoundError(f"{table} not found: run `nnunet-mtl predict` first")
    masks = sorted(p for p in prediction_dir.glob(f"*{MASK_ENDING}") if not p.name.startswith("."))
    if not masks:
        raise FileNotFoundError(f"{prediction_dir} holds no {MASK_ENDING} masks")
    cases = {m.name[: -len(MASK_ENDING)] for m in masks}
    try:
        problems = _check_table(table.read_bytes(), cases, num_subtypes, unknown="has no mask in the folder")
    except OSError as e:
        problems = [f"{table}: cannot be read ({e})"]
    problems = [p.replace(SUBTYPE_CSV, str(table), 1) for p in problems]
    for mask in masks:
        problems += _mask_problems(mask, str(mask), None)
    if problems:
        raise SubmissionError(f"{len(problems)} problem(s), no zip written:\n"
                              + "\n".join(f"  - {p}" for p in problems))
    make_dirs(zip_path.parent)
    remove_stale(zip_path.parent)
    tmp = temp_path(zip_path)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for mask in masks:
                zf.write(mask, arcname=mask.name)
            zf.write(table, arcname=SUBTYPE_CSV)
        os.replace(tmp, zip_path)
    finally:
        tmp.unlink(missing_ok=True)
    return [m.name[: -len(MASK_ENDING)] for m in masks]


def check_submission(zip_path: Path, images_dir: Path, num_subtypes: int = 3) -> list[str]:
    """Every problem found, as readable sentences; an empty list means the zip is valid."""
    problems: list[str] = []
    images = {p.name[: -len(IMAGE_SUFFIX)]: p for p in sorted(images_dir.glob(f"*{IMAGE_SUFFIX}"))
              if not p.name.startswith(".")}
    if not images:
        return [f"{images_dir} holds no test images named <case>{IMAGE_SUFFIX}"]
    try:
        zf = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as e:
        return [f"{zip_path}: not a readable zip ({e})"]
    with zf:
        names = zf.namelist()
        nested = [n for n in names if "/" in n.rstrip("/")]
        if nested:
            problems.append(f"files must be at the zip root, found in folders: {nested[:5]}")
        if SUBTYPE_CSV not in names:
            problems.append(f"{SUBTYPE_CSV} is missing from the zip root")
        else:
            try:
                problems += _check_table(zf.read(SUBTYPE_CSV), set(images), num_subtypes)
            except (zipfile.BadZipFile, OSError, zlib.error) as e:
                problems.append(f"{SUBTYPE_CSV} is damaged inside the zip ({e})")
        masks = {n[: -len(MASK_ENDING)]: n for n in names if n.endswith(MASK_ENDING) and "/" not in n}
        for case in sorted(set(images) - set(masks)):
            problems.append(f"mask {case}{MASK_ENDING} is missing")
        for case in sorted(set(masks) - set(images)):
            problems.append(f"mask {case}{MASK_ENDING} has no test image")
        with tempfile.TemporaryDirectory() as tmp:
            for case in sorted(set(masks) & set(images)):
                problems += _check_mask(zf, masks[case], images[case], Path(tmp))
    return problems


def _check_table(data: bytes, cases: set[str], num_subtypes: int, unknown: str = "is not a test case") -> list[str]:
    problems = []
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))
    except (UnicodeDecodeError, csv.Error) as e:
        return [f"{SUBTYPE_CSV}: not a readable UTF-8 CSV table ({e})"]
    if not rows or rows[0] != HEADER:
        return [f"{SUBTYPE_CSV}: header must be exactly {','.join(HEADER)}, got {','.join(rows[0]) if rows else ''}"]
    seen: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            problems.append(f"{SUBTYPE_CSV} line {line}: expected 2 columns, got {row}")
            continue
        name, value = row
        case = name[: -len(MASK_ENDING)] if name.endswith(MASK_ENDING) else None
        if case is None:
            problems.append(f"{SUBTYPE_CSV} line {line}: name {name!r} must end with {MASK_ENDING}")
            continue
        seen[case] = seen.get(case, 0) + 1
        if case not in cases:
            problems.append(f"{SUBTYPE_CSV} line {line}: {name} {unknown}")
        if value not in {str(i) for i in range(num_subtypes)}:
            problems.append(f"{SUBTYPE_CSV} line {line}: subtype {value!r} is not one of 0..{num_subtypes - 1}")
    problems += [f"{SUBTYPE_CSV}: {c}{MASK_ENDING} listed {n} times" for c, n in sorted(seen.items()) if n > 1]
    problems += [f"{SUBTYPE_CSV}: {c}{MASK_ENDING} is missing" for c in sorted(cases - set(seen))]
    return problems


def _check_mask(zf: zipfile.ZipFile, member: str, image_file: Path, tmp: Path) -> list[str]:
    target = tmp / "mask.nii.gz"
    try:
        target.write_bytes(zf.read(member))  # zipfile checks the member's CRC-32
    except (zipfile.BadZipFile, OSError, zlib.error) as e:
        return [f"mask {member} is damaged inside the zip ({e})"]
    try:
        return _mask_problems(target, f"mask {member}", image_file)
    finally:
        target.unlink(missing_ok=True)


def _mask_problems(path: Path, name: str, image_file: Path | None) -> list[str]:
    """A mask must be whole, uint8, labels 0..2, and (with an image) on the image's grid; ``name`` is how the
    problems call the mask (a zip member is read from a temporary copy)."""
    try:
        mask = read_volume(path, "mask")
    except NiftiError as e:
        return [f"{name}: {e.problem}"]
    problems = []
    if not mask.compressed:
        problems.append(f"{name}: not gzip-compressed although named {MASK_ENDING} (validators that open .nii.gz "
                        "files with gzip, as nibabel does, fail on it); save it compressed")
    if mask.array.dtype != np.uint8:
        problems.append(f"{name}: voxels are {mask.array.dtype.name}; masks hold integer labels and must be stored as "
                        "uint8, as nnU-Net writes them (validators of the task reject float masks)")
    values = np.unique(mask.array)
    if not set(values.tolist()) <= {0, 1, 2}:
        problems.append(f"{name}: labels {values.tolist()[:8]} outside 0, 1, 2")
    if image_file is None:
        return problems
    try:
        image = read_geometry(image_file, "image")
    except NiftiError as e:
        return [*problems, f"test image {e.path.name}: {e.problem}"]
    if mask.geometry.size != image.size:
        problems.append(f"{name}: size {mask.geometry.size} differs from image {image.size}")
    for what, a, b in [("spacing", mask.geometry.spacing, image.spacing),
                       ("origin", mask.geometry.origin, image.origin),
                       ("direction", mask.geometry.direction, image.direction)]:
        if not np.allclose(a, b, atol=GEOMETRY_TOLERANCE, rtol=GEOMETRY_TOLERANCE):
            problems.append(f"{name}: {what} {_rounded(a)} differs from image {_rounded(b)}")
    return problems


def _rounded(values: tuple[float, ...]) -> tuple[float, ...]:
    """Plain floats for messages (numpy 2 prints np.float64(...)); + 0.0 turns ITK's -0.0 into 0.0."""
    return tuple(round(float(v), 5) + 0.0 for v in values)
