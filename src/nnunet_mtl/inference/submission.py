"""The task's submission zip (all masks at the zip root plus ``subtype_results.csv``) and its validator."""

from __future__ import annotations

import csv
import io
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_mtl.inference.outputs import MASK_ENDING, SUBTYPE_CSV
from nnunet_mtl.inference.parts import gather_parts
from nnunet_mtl.inference.predict import IMAGE_SUFFIX

HEADER = ["Names", "Subtype"]
GEOMETRY_TOLERANCE = 1e-4


def pack_submission(prediction_dir: Path, zip_path: Path) -> list[str]:
    """Zip every mask and the subtype table, flat; returns the case ids packed.

    A folder predicted in parts is gathered first (refused with :class:`~nnunet_mtl.inference.parts.IncompleteParts`
    unless every part is there and finished)."""
    gather_parts(prediction_dir)
    table = prediction_dir / SUBTYPE_CSV
    if not table.is_file():
        raise FileNotFoundError(f"{table} not found: run `nnunet-mtl predict` first")
    masks = sorted(p for p in prediction_dir.glob(f"*{MASK_ENDING}") if not p.name.startswith("."))
    if not masks:
        raise FileNotFoundError(f"{prediction_dir} holds no {MASK_ENDING} masks")
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=zip_path.parent, prefix=f".{zip_path.name}", suffix=".tmp")
    os.close(fd)
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for mask in masks:
            zf.write(mask, arcname=mask.name)
        zf.write(table, arcname=SUBTYPE_CSV)
    os.replace(tmp, zip_path)
    return [m.name[: -len(MASK_ENDING)] for m in masks]


def check_submission(zip_path: Path, images_dir: Path, num_subtypes: int = 3) -> list[str]:
    """Every problem found, as readable sentences; an empty list means the zip is valid."""
    problems: list[str] = []
    images = {p.name[: -len(IMAGE_SUFFIX)]: p for p in sorted(images_dir.glob(f"*{IMAGE_SUFFIX}"))}
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
            problems += _check_table(zf.read(SUBTYPE_CSV).decode("utf-8-sig"), set(images), num_subtypes)
        masks = {n[: -len(MASK_ENDING)]: n for n in names if n.endswith(MASK_ENDING) and "/" not in n}
        for case in sorted(set(images) - set(masks)):
            problems.append(f"mask {case}{MASK_ENDING} is missing")
        for case in sorted(set(masks) - set(images)):
            problems.append(f"mask {case}{MASK_ENDING} has no test image")
        with tempfile.TemporaryDirectory() as tmp:
            for case in sorted(set(masks) & set(images)):
                problems += _check_mask(zf, masks[case], images[case], Path(tmp))
    return problems


def _check_table(text: str, cases: set[str], num_subtypes: int) -> list[str]:
    problems = []
    rows = list(csv.reader(io.StringIO(text)))
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
            problems.append(f"{SUBTYPE_CSV} line {line}: {name} is not a test case")
        if value not in {str(i) for i in range(num_subtypes)}:
            problems.append(f"{SUBTYPE_CSV} line {line}: subtype {value!r} is not one of 0..{num_subtypes - 1}")
    problems += [f"{SUBTYPE_CSV}: {c}{MASK_ENDING} listed {n} times" for c, n in sorted(seen.items()) if n > 1]
    problems += [f"{SUBTYPE_CSV}: {c}{MASK_ENDING} is missing" for c in sorted(cases - set(seen))]
    return problems


def _check_mask(zf: zipfile.ZipFile, member: str, image_file: Path, tmp: Path) -> list[str]:
    target = tmp / member
    target.write_bytes(zf.read(member))
    try:
        mask = sitk.ReadImage(str(target))
    except RuntimeError:
        return [f"mask {member} cannot be read"]
    finally:
        target.unlink()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(image_file))
    reader.ReadImageInformation()
    problems = []
    if mask.GetSize() != reader.GetSize():
        problems.append(f"mask {member}: size {mask.GetSize()} differs from image {reader.GetSize()}")
    for what, a, b in [("spacing", mask.GetSpacing(), reader.GetSpacing()),
                       ("origin", mask.GetOrigin(), reader.GetOrigin()),
                       ("direction", mask.GetDirection(), reader.GetDirection())]:
        if not np.allclose(a, b, atol=GEOMETRY_TOLERANCE, rtol=GEOMETRY_TOLERANCE):
            problems.append(f"mask {member}: {what} {tuple(np.round(a, 5))} differs from image {tuple(np.round(b, 5))}")
    values = np.unique(sitk.GetArrayViewFromImage(mask))
    if not set(values.tolist()) <= {0, 1, 2}:
        problems.append(f"mask {member}: labels {values.tolist()} outside 0, 1, 2")
    return problems
