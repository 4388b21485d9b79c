"""The submission zip and its validator, on hand-made masks (no model needed)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mtl.cli import main as cli_main
from nnunet_mtl.inference.outputs import write_subtype_tables
from nnunet_mtl.inference.submission import check_submission, pack_submission

CASES = ["quiz_001", "quiz_002", "quiz_003"]


def image(array: np.ndarray, spacing=(0.7, 0.7, 2.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin((10.0, -5.0, 3.0))
    return img


@pytest.fixture()
def prediction(tmp_path) -> tuple[Path, Path]:
    images, preds = tmp_path / "test", tmp_path / "preds"
    images.mkdir()
    preds.mkdir()
    probabilities = {}
    for i, case in enumerate(CASES):
        sitk.WriteImage(image(np.zeros((6, 10, 12), np.int16)), str(images / f"{case}_0000.nii.gz"))
        mask = np.zeros((6, 10, 12), np.uint8)
        mask[2:4, 3:6, 3:7] = 1
        mask[3, 4, 4] = 2
        sitk.WriteImage(image(mask), str(preds / f"{case}.nii.gz"))
        probabilities[case] = np.roll(np.array([0.7, 0.2, 0.1]), i)
    write_subtype_tables(preds, probabilities)
    return images, preds


def test_pack_and_check_a_valid_submission(prediction, tmp_path):
    images, preds = prediction
    zip_path = tmp_path / "results.zip"
    assert pack_submission(preds, zip_path) == CASES
    with zipfile.ZipFile(zip_path) as zf:
        assert sorted(zf.namelist()) == sorted([f"{c}.nii.gz" for c in CASES] + ["subtype_results.csv"])
        rows = zf.read("subtype_results.csv").decode().splitlines()
    assert rows == ["Names,Subtype", "quiz_001.nii.gz,0", "quiz_002.nii.gz,1", "quiz_003.nii.gz,2"]
    assert check_submission(zip_path, images) == []
    assert cli_main(["check-submission", str(zip_path), "--images", str(images)]) == 0


def rewrite(zip_path: Path, out: Path, replace: dict[str, bytes | None]) -> Path:
    with zipfile.ZipFile(zip_path) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            if name in replace:
                if replace[name] is not None:
                    dst.writestr(name, replace[name])
            else:
                dst.writestr(name, src.read(name))
        for name, data in replace.items():
            if name not in src.namelist() and data is not None:
                dst.writestr(name, data)
    return out


@pytest.mark.parametrize("change, expected", [
    ({"subtype_results.csv": b"Name,Subtype\nquiz_001.nii.gz,0\n"}, "header must be exactly Names,Subtype"),
    ({"subtype_results.csv": b"Names,Subtype\nquiz_001.nii.gz,0\nquiz_002.nii.gz,5\nquiz_003.nii.gz,1\n"},
     "subtype '5' is not one of 0..2"),
    ({"subtype_results.csv": b"Names,Subtype\nquiz_001.nii.gz,0\nquiz_001.nii.gz,1\nquiz_003.nii.gz,1\n"},
     "quiz_001.nii.gz listed 2 times"),
    ({"quiz_002.nii.gz": None}, "mask quiz_002.nii.gz is missing"),
    ({"quiz_002.nii.gz": b"garbage"}, "mask quiz_002.nii.gz: is not a NIfTI file"),
    ({"extra/quiz_009.nii.gz": b"x"}, "files must be at the zip root"),
])
def test_broken_submissions_are_explained(prediction, tmp_path, change, expected):
    images, preds = prediction
    good = tmp_path / "good.zip"
    pack_submission(preds, good)
    broken = rewrite(good, tmp_path / "broken.zip", change)
    problems = check_submission(broken, images)
    assert any(expected in p for p in problems), problems


def test_mask_geometry_must_match_the_image(prediction, tmp_path):
    images, preds = prediction
    sitk.WriteImage(image(np.zeros((6, 10, 12), np.uint8), spacing=(0.8, 0.7, 2.0)), str(preds / "quiz_003.nii.gz"))
    zip_path = tmp_path / "results.zip"
    pack_submission(preds, zip_path)
    problems = check_submission(zip_path, images)
    assert any("quiz_003.nii.gz: spacing" in p for p in problems)
    assert cli_main(["check-submission", str(zip_path), "--images", str(images)]) == 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_masks_must_be_uint8_label_maps(prediction, tmp_path, capsys, dtype):
    """Integer labels stored as uint8, as nnU-Net writes them; a peer's validator rejects float masks."""
    images, preds = prediction
    good = tmp_path / "good.zip"
    pack_submission(preds, good)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(preds / "quiz_002.nii.gz"))).astype(dtype)
    other = tmp_path / "other.nii.gz"
    sitk.WriteImage(image(mask), str(other))
    broken = rewrite(good, tmp_path / "broken.zip", {"quiz_002.nii.gz": other.read_bytes()})
    assert cli_main(["check-submission", str(broken), "--images", str(images)]) == 2
    out = capsys.readouterr().out
    assert f"mask quiz_002.nii.gz: voxels are {np.dtype(dtype).name}; masks hold integer labels and must be stored " \
           "as uint8" in out
    # packing such a folder is refused too, with the file named, and no zip appears
    sitk.WriteImage(image(mask), str(preds / "quiz_002.nii.gz"))
    assert cli_main(["submission", str(preds), "--zip", str(tmp_path / "new" / "results.zip")]) == 2
    assert f"{preds / 'quiz_002.nii.gz'}: voxels are {np.dtype(dtype).name}" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # no zip, no temporary, no empty folder
