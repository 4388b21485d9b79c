"""The submission zip and its validator, on hand-made masks (no model needed)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from volumes import read_array, write_volume

from nnunet_mtl.cli import main as cli_main
from nnunet_mtl.inference.outputs import write_subtype_tables
from nnunet_mtl.inference.submission import check_submission, pack_submission

CASES = ["quiz_001", "quiz_002", "quiz_003"]


SPACING, ORIGIN = (0.7, 0.7, 2.0), (10.0, -5.0, 3.0)


@pytest.fixture()
def prediction(tmp_path) -> tuple[Path, Path]:
    images, preds = tmp_path / "test", tmp_path / "preds"
    images.mkdir()
    preds.mkdir()
    probabilities = {}
    for i, case in enumerate(CASES):
        write_volume(images / f"{case}_0000.nii.gz", np.zeros((6, 10, 12), np.int16), SPACING, ORIGIN)
        mask = np.zeros((6, 10, 12), np.uint8)
        mask[2:4, 3:6, 3:7] = 1
        mask[3, 4, 4] = 2
        write_volume(preds / f"{case}.nii.gz", mask, SPACING, ORIGIN)
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


def mask_bytes(tmp_path: Path, array: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=None) -> bytes:
    return write_volume(tmp_path / "made" / "mask.nii.gz", array, spacing, origin, direction).read_bytes()


def good_mask() -> np.ndarray:
    mask = np.zeros((6, 10, 12), np.uint8)
    mask[2:4, 3:6, 3:7] = 1
    return mask


def with_label(value: int) -> np.ndarray:
    mask = good_mask()
    mask[0, 0, 0] = value
    return mask


TABLE = "subtype_results.csv"
BROKEN = {
    "header": ({TABLE: b"Name,Subtype\nquiz_001.nii.gz,0\n"},
               [f"{TABLE}: header must be exactly Names,Subtype, got Name,Subtype"]),
    "empty table": ({TABLE: b""}, [f"{TABLE}: header must be exactly Names,Subtype, got "]),
    "subtype": ({TABLE: b"Names,Subtype\nquiz_001.nii.gz,0\nquiz_002.nii.gz,5\nquiz_003.nii.gz,1\n"},
                [f"{TABLE} line 3: subtype '5' is not one of 0..2"]),
    "negative subtype": ({TABLE: b"Names,Subtype\nquiz_001.nii.gz,-1\nquiz_002.nii.gz,1\nquiz_003.nii.gz,1\n"},
                         [f"{TABLE} line 2: subtype '-1' is not one of 0..2"]),
    "listed twice": ({TABLE: b"Names,Subtype\nquiz_001.nii.gz,0\nquiz_001.nii.gz,1\nquiz_003.nii.gz,1\n"},
                     [f"{TABLE}: quiz_001.nii.gz listed 2 times", f"{TABLE}: quiz_002.nii.gz is missing"]),
    "columns": ({TABLE: b"Names,Subtype\nquiz_001.nii.gz,0,x\nquiz_002.nii.gz,1\nquiz_003.nii.gz,1\n"},
                [f"{TABLE} line 2: expected 2 columns, got ['quiz_001.nii.gz', '0', 'x']",
                 f"{TABLE}: quiz_001.nii.gz is missing"]),
    "name": ({TABLE: b"Names,Subtype\nquiz_001,0\nquiz_002.nii.gz,1\nquiz_003.nii.gz,1\n"},
             [f"{TABLE} line 2: name 'quiz_001' must end with .nii.gz", f"{TABLE}: quiz_001.nii.gz is missing"]),
    "not a test case": ({TABLE: b"Names,Subtype\nquiz_001.nii.gz,0\nquiz_002.nii.gz,1\nquiz_003.nii.gz,1\n"
                                b"quiz_009.nii.gz,2\n"},
                        [f"{TABLE} line 5: quiz_009.nii.gz is not a test case"]),
    "table missing": ({TABLE: None}, [f"{TABLE} is missing from the zip root"]),
    "mask missing": ({"quiz_002.nii.gz": None}, ["mask quiz_002.nii.gz is missing"]),
    "mask unreadable": ({"quiz_002.nii.gz": b"garbage"}, ["mask quiz_002.nii.gz: is not a NIfTI file "
                                                       "(no NIfTI header; first bytes b'garbage')"]),
    "nested": ({"extra/quiz_009.nii.gz": b"x"},
               ["files must be at the zip root, found in folders: ['extra/quiz_009.nii.gz']"]),
    "many nested": ({f"extra/{i}.txt": b"x" for i in range(6)},  # the first five are named
                    [f"files must be at the zip root, found in folders: {[f'extra/{i}.txt' for i in range(5)]}"]),
    "folder entry": ({"docs/": b""}, []),  # a bare folder entry holds no file
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_submissions_are_explained(prediction, tmp_path, kind):
    """Every problem of a broken zip in full, nothing else."""
    images, preds = prediction
    good = tmp_path / "good.zip"
    pack_submission(preds, good)
    change, expected = BROKEN[kind]
    assert check_submission(rewrite(good, tmp_path / "broken.zip", change), images) == expected


@pytest.mark.parametrize("make, expected", [
    (lambda: with_label(3), ["mask quiz_001.nii.gz: labels [0, 1, 3] outside 0, 1, 2"]),
    (lambda: with_label(2), []),
    (lambda: good_mask()[:, :, :11], ["mask quiz_001.nii.gz: size (11, 10, 6) differs from image (12, 10, 6)"]),
])
def test_mask_labels_and_size_are_checked(prediction, tmp_path, make, expected):
    images, preds = prediction
    good = tmp_path / "good.zip"
    pack_submission(preds, good)
    broken = rewrite(good, tmp_path / "broken.zip", {"quiz_001.nii.gz": mask_bytes(tmp_path, make())})
    assert check_submission(broken, images) == expected


@pytest.mark.parametrize("geometry, expected", [
    ({"origin": (10.001, -5.0, 3.0)}, []),  # within 1e-4 + 1e-4 x 10 mm
    ({"origin": (10.0123456, -5.0, 3.0)},  # shown rounded to 5 decimals
     ["mask quiz_001.nii.gz: origin (10.01235, -5.0, 3.0) differs from image (10.0, -5.0, 3.0)"]),
    ({"spacing": (0.7, 0.70005, 2.0)}, []),
    ({"spacing": (0.7, 0.7, 2.001)},
     ["mask quiz_001.nii.gz: spacing (0.7, 0.7, 2.001) differs from image (0.7, 0.7, 2.0)"]),
    ({"direction": (-1, 0, 0, 0, -1, 0, 0, 0, 1)},
     ["mask quiz_001.nii.gz: direction (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0) differs from image "
      "(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)"]),
])
def test_mask_geometry_tolerance(prediction, tmp_path, geometry, expected):
    images, preds = prediction
    good = tmp_path / "good.zip"
    pack_submission(preds, good)
    made = mask_bytes(tmp_path, good_mask(), **{"spacing": SPACING, "origin": ORIGIN, **geometry})
    assert check_submission(rewrite(good, tmp_path / "broken.zip", {"quiz_001.nii.gz": made}), images) == expected


def test_extra_masks_other_subtype_counts_and_unusable_inputs(prediction, tmp_path):
    images, preds = prediction
    good = tmp_path / "good.zip"
    pack_submission(preds, good)
    extra = rewrite(good, tmp_path / "extra.zip", {"quiz_009.nii.gz": mask_bytes(tmp_path, good_mask())})
    assert check_submission(extra, images) == ["mask quiz_009.nii.gz has no test image"]
    assert check_submission(good, images, num_subtypes=2) == [f"{TABLE} line 4: subtype '2' is not one of 0..1"]
    bom = rewrite(good, tmp_path / "bom.zip", {TABLE: b"\xef\xbb\xbf" + (preds / TABLE).read_bytes()})
    assert check_submission(bom, images) == []  # a spreadsheet's byte-order mark is not a header error
    (tmp_path / "not.zip").write_bytes(b"not a zip")
    assert check_submission(tmp_path / "not.zip", images) == [
        f"{tmp_path / 'not.zip'}: not a readable zip (File is not a zip file)"]
    (tmp_path / "no_images").mkdir()
    assert check_submission(good, tmp_path / "no_images") == [
        f"{tmp_path / 'no_images'} holds no test images named <case>_0000.nii.gz"]


def test_pack_writes_a_compressed_zip_through_a_hidden_temporary_file(prediction, tmp_path, monkeypatch):
    images, preds = prediction
    import nnunet_mtl.inference.submission as submission

    renamed = []
    original = submission.os.replace
    monkeypatch.setattr(submission.os, "replace", lambda src, dst: renamed.append((Path(src), Path(dst))) or
                        original(src, dst))
    zip_path = tmp_path / "out" / "results.zip"
    pack_submission(preds, zip_path)
    ((temporary, final),) = renamed
    assert final == zip_path and temporary.parent == zip_path.parent  # same folder: the rename is atomic
    assert temporary.name.startswith(".results.zip.tmp-")  # hidden, owned by this process (tempfiles.owner_tag)
    assert temporary.name.endswith(f"-{os.getpid()}")
    with zipfile.ZipFile(zip_path) as zf:
        assert {info.compress_type for info in zf.infolist()} == {zipfile.ZIP_DEFLATED}


def test_pack_takes_visible_masks_only_and_refuses_an_unfinished_folder(prediction, tmp_path):
    images, preds = prediction
    (preds / ".quiz_004.tmp.nii.gz").write_bytes(b"half")  # an interrupted write's temporary file
    zip_path = tmp_path / "deep" / "er" / "results.zip"
    assert pack_submission(preds, zip_path) == CASES
    with zipfile.ZipFile(zip_path) as zf:
        assert ".quiz_004.tmp.nii.gz" not in zf.namelist()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / TABLE).write_text("Names,Subtype\n")
    with pytest.raises(FileNotFoundError, match=f"{empty} holds no .nii.gz masks"):
        pack_submission(empty, tmp_path / "x.zip")
    with pytest.raises(FileNotFoundError, match="subtype_results.csv not found: run `nnunet-mtl predict` first"):
        pack_submission(tmp_path / "deep", tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists() and sorted(p.name for p in zip_path.parent.iterdir()) == ["results.zip"]


def test_mask_geometry_must_match_the_image(prediction, tmp_path):
    images, preds = prediction
    write_volume(preds / "quiz_003.nii.gz", np.zeros((6, 10, 12), np.uint8), (0.8, 0.7, 2.0), ORIGIN)
    zip_path = tmp_path / "results.zip"
    pack_submission(preds, zip_path)
    problems = check_submission(zip_path, images)
    assert any("quiz_003.nii.gz: spacing" in p for p in problems)
    assert cli_main(["check-submission", str(zip_path), "--images", str(images)]) == 2


def test_submission_command_zips_the_prediction_folder(prediction, tmp_path, capsys):
    images, preds = prediction
    zip_path = tmp_path / "out" / "results.zip"
    assert cli_main(["submission", str(preds), "--zip", str(zip_path)]) == 0
    assert f"{zip_path}: 3 masks + subtype_results.csv" in capsys.readouterr().out
    with zipfile.ZipFile(zip_path) as zf:
        assert sorted(zf.namelist()) == sorted([f"{c}.nii.gz" for c in CASES] + ["subtype_results.csv"])
        for name in zf.namelist():
            assert zf.read(name) == (preds / name).read_bytes()
    assert [p.name for p in zip_path.parent.iterdir()] == ["results.zip"]  # no temporary file left
    assert cli_main(["check-submission", str(zip_path), "--images", str(images)]) == 0
    (preds / "subtype_results.csv").unlink()
    assert cli_main(["submission", str(preds), "--zip", str(tmp_path / "again.zip")]) == 2
    assert "run `nnunet-mtl predict` first" in capsys.readouterr().err
    assert not (tmp_path / "again.zip").exists()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_masks_must_be_uint8_label_maps(prediction, tmp_path, capsys, dtype):
    """Integer labels stored as uint8, as nnU-Net writes them; a peer's validator rejects float masks."""
    images, preds = prediction
    good = tmp_path / "good.zip"
    pack_submission(preds, good)
    mask = read_array(preds / "quiz_002.nii.gz").astype(dtype)
    broken = rewrite(good, tmp_path / "broken.zip", {"quiz_002.nii.gz": mask_bytes(tmp_path, mask)})
    assert cli_main(["check-submission", str(broken), "--images", str(images)]) == 2
    out = capsys.readouterr().out
    assert f"mask quiz_002.nii.gz: voxels are {np.dtype(dtype).name}; masks hold integer labels and must be stored " \
           "as uint8" in out
    # packing such a folder is refused too, with the file named, and no zip appears
    write_volume(preds / "quiz_002.nii.gz", mask, SPACING, ORIGIN)
    assert cli_main(["submission", str(preds), "--zip", str(tmp_path / "new" / "results.zip")]) == 2
    assert f"{preds / 'quiz_002.nii.gz'}: voxels are {np.dtype(dtype).name}" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # no zip, no temporary, no empty folder


def test_pack_refusals_name_the_table_and_each_mask_in_full(prediction, tmp_path):
    """pack_submission's message: one line per problem, the table and masks named by their path, the reader's
    role words ("mask") and the first eight bad labels only."""
    import SimpleITK as sitk

    from nnunet_mtl.inference.submission import SubmissionError

    images, preds = prediction
    probabilities = {c: np.array([0.7, 0.2, 0.1]) for c in CASES + ["quiz_004"]}
    write_subtype_tables(preds, probabilities)  # quiz_004 is listed but has no mask
    labels = np.zeros((6, 10, 12), np.uint8)
    labels.flat[:10] = np.arange(3, 13)  # ten labels outside 0, 1, 2: the message shows the first eight values
    write_volume(preds / "quiz_002.nii.gz", labels, SPACING, ORIGIN)
    flat = sitk.GetImageFromArray(np.zeros((10, 12), np.uint8))
    sitk.WriteImage(flat, str(preds / "quiz_003.nii.gz"))
    with pytest.raises(SubmissionError) as raised:
        pack_submission(preds, tmp_path / "x.zip")
    assert str(raised.value).splitlines() == [
        "3 problem(s), no zip written:",
        f"  - {preds / TABLE} line 5: quiz_004.nii.gz has no mask in the folder",
        f"  - {preds / 'quiz_002.nii.gz'}: labels [0, 3, 4, 5, 6, 7, 8, 9] outside 0, 1, 2",
        f"  - {preds / 'quiz_003.nii.gz'}: mask is 2D (size [12, 10]), expected 3D",
    ]
    assert not (tmp_path / "x.zip").exists()


def test_an_uncompressed_mask_named_nii_gz_is_refused(prediction, tmp_path):
    import SimpleITK as sitk

    images, preds = prediction
    good = tmp_path / "good.zip"
    pack_submission(preds, good)
    image = sitk.GetImageFromArray(good_mask())
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    sitk.WriteImage(image, str(tmp_path / "plain.nii"))  # uncompressed bytes under a .nii.gz name
    broken = rewrite(good, tmp_path / "broken.zip", {"quiz_001.nii.gz": (tmp_path / "plain.nii").read_bytes()})
    assert check_submission(broken, images) == [
        "mask quiz_001.nii.gz: not gzip-compressed although named .nii.gz (validators that open .nii.gz files with "
        "gzip, as nibabel does, fail on it); save it compressed"]


def test_hidden_files_among_the_images_are_not_test_cases(prediction, tmp_path):
    images, preds = prediction
    good = tmp_path / "good.zip"
    pack_submission(preds, good)
    write_volume(images / ".quiz_009_0000.nii.gz", np.zeros((6, 10, 12), np.int16), SPACING, ORIGIN)
    assert check_submission(good, images) == []


def test_a_damaged_table_inside_the_zip_is_named(prediction, tmp_path):
    """A CRC failure of the table's member: said as such, not a traceback."""
    images, preds = prediction
    good = tmp_path / "good.zip"
    pack_submission(preds, good)
    stored = tmp_path / "stored.zip"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(stored, "w", compression=zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    data = bytearray(stored.read_bytes())
    at = data.index(b"quiz_002.nii.gz,1")  # inside the stored table's bytes
    data[at] ^= 0x20
    stored.write_bytes(bytes(data))
    problems = check_submission(stored, images)
    assert len(problems) == 1 and problems[0].startswith(f"{TABLE} is damaged inside the zip (")
    assert "CRC" in problems[0]
