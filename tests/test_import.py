"""`nnunet-mtl import`: every kind of bad input is named with its file, nothing is left behind, and a good dataset
arrives in nnU-Net's raw format with our extra keys and splits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from tiny import REAL_CT
from volumes import write_volume

from nnunet_mtl.cli import build_parser, main
from nnunet_mtl.cli import data as cli_data
from nnunet_mtl.data import importer

SHAPE = (8, 16, 16)  # z, y, x
SPACING = (0.75, 0.75, 2.0)  # x, y, z as SimpleITK orders it
ORIGIN = (10.0, -20.0, 30.0)
DATASET = "Dataset007_Pancreas"


@pytest.fixture(autouse=True)
def import_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """paths.configure() writes nnU-Net's variables into os.environ; register them so they are restored."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / "unused" / var))
    for var in ("nnUNet_def_n_proc", "nnUNet_n_proc_DA"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))


@pytest.fixture
def import_work(tmp_path: Path) -> Path:
    return tmp_path / "work"


def write_nifti(path: Path, array: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=None) -> None:
    write_volume(path, array, spacing, origin, direction)


def make_mask(lesion: bool = True, dtype=np.uint8) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype)
    mask[2:6, 4:12, 4:12] = 1
    if lesion:
        mask[3:5, 6:9, 6:9] = 2
    return mask


def make_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-200, 300, SHAPE).astype(np.int16)


def add_case(root: Path, split: str, subtype: int, number: int, lesion: bool = True) -> str:
    case_id = f"quiz_{subtype}_{number:03d}"
    folder = root / split / f"subtype{subtype}"
    write_nifti(folder / f"{case_id}_0000.nii.gz", make_image(number))
    write_nifti(folder / f"{case_id}.nii.gz", make_mask(lesion))
    return case_id


def make_published(root: Path, train=(2, 2, 2), validation=(1, 1, 1), test: int = 2) -> dict[str, list[str]]:
    """A tiny dataset in the published layout; returns the case ids per split."""
    ids: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    number = 0
    for split, counts in (("train", train), ("validation", validation)):
        for subtype, n in enumerate(counts):
            for _ in range(n):
                number += 1
                ids[split].append(add_case(root, split, subtype, number))
    for i in range(test):
        write_nifti(root / "test" / f"quiz_{500 + i:03d}_0000.nii.gz", make_image(500 + i))
        ids["test"].append(f"quiz_{500 + i:03d}")
    return ids


def run_import(capsys: pytest.CaptureFixture, work: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["import", *argv, "--workdir", str(work), "--dataset-id", "7", "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_rejected(capsys: pytest.CaptureFixture, work: Path, root: Path, *fragments: str) -> str:
    """The import exits 2, names every fragment, and leaves nothing: no dataset, no temporary folder, not even the
    empty nnUNet_* folders of a work folder it created."""
    code, _, err = run_import(capsys, work, str(root))
    assert code == 2, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    assert "Traceback" not in err
    assert not work.exists()
    return err


def read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


# ------------------------------------------------------------------------------------------------ happy path


def test_published_layout_is_imported(tmp_path: Path, import_work: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "src"
    ids = make_published(root, train=(5, 6, 5), validation=(1, 2, 1), test=3)
    no_lesion = add_case(root, "train", 1, 99, lesion=False)
    ids["train"].append(no_lesion)

    code, out, err = run_import(capsys, import_work, str(root))

    assert code == 0, err
    target = import_work / "nnUNet_raw" / DATASET
    labelled = ids["train"] + ids["validation"]
    assert sorted(p.name for p in (target / "imagesTr").iterdir()) == sorted(f"{c}_0000.nii.gz" for c in labelled)
    assert sorted(p.name for p in (target / "labelsTr").iterdir()) == sorted(f"{c}.nii.gz" for c in labelled)
    assert sorted(p.name for p in (target / "imagesTs").iterdir()) == sorted(f"{c}_0000.nii.gz" for c in ids["test"])
    assert sorted(p.name for p in import_work.joinpath("nnUNet_raw").iterdir()) == [DATASET]  # no temp folder left

    dataset = json.loads((target / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT"}
    assert dataset["labels"] == {"background": 0, "pancreas": 1, "lesion": 2}
    assert dataset["numTraining"] == len(labelled)
    assert dataset["file_ending"] == ".nii.gz"
    assert dataset["subtype_names"] == {"0": "subtype0", "1": "subtype1", "2": "subtype2"}
    assert dataset["case_subtypes"] == {c: int(c.split("_")[1]) for c in labelled}

    splits = json.loads((target / "splits_final.json").read_text())
    assert len(splits) == 6
    assert splits[0] == {"train": sorted(ids["train"]), "val": sorted(ids["validation"])}
    vals = [set(fold["val"]) for fold in splits[1:]]
    assert set().union(*vals) == set(ids["train"]) and sum(map(len, vals)) == len(ids["train"])  # disjoint, covering
    for fold in splits[1:]:
        assert set(fold["train"]) | set(fold["val"]) == set(ids["train"])
        assert not set(fold["train"]) & set(fold["val"])
        # stratified: 5, 7 and 5 training cases per subtype -> every fold validates on 1, 1-2 and 1 of them
        counts = Counter(dataset["case_subtypes"][c] for c in fold["val"])
        assert counts[0] == 1 and counts[2] == 1 and counts[1] in (1, 2)

    image_in = root / "train/subtype0" / f"{ids['train'][0]}_0000.nii.gz"
    assert (target / "imagesTr" / image_in.name).read_bytes() == image_in.read_bytes()  # copied byte for byte
    label = read(target / "labelsTr" / f"{ids['train'][0]}.nii.gz")
    assert label.GetPixelID() == sitk.sitkUInt8
    assert geometry(label) == geometry(read(image_in))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), make_mask())

    assert f"train/subtype1/{no_lesion}.nii.gz: no voxel of label 2 (lesion)" in err
    assert "warning:" in err
    for fragment in ("train", "validation", "test", "subtype0", "spacing mm (z, y, x)", "2, 0.75, 0.75",
                     "size voxels (z, y, x)", "8, 16, 16", "masks rounded to integers: 0 of 21",
                     "fold 0 = the given train/validation split, folds 1-5 = stratified"):
        assert fragment in out, out


def test_nnunet_accepts_the_imported_dataset(tmp_path: Path) -> None:
    """nnU-Net's own integrity check (labels, grids, counts) passes on what we wrote."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    root = tmp_path / "src"
    make_published(root, train=(1, 1, 1), validation=(1, 1, 1), test=1)
    write_nifti(root / "train/subtype0/quiz_0_001.nii.gz", make_mask(dtype=np.float32) * np.float32(1.0000152587890625))
    report = importer.import_dataset(importer.scan_published(root), tmp_path / "raw", 7, progress=False)
    verify_dataset_integrity(str(report.target), num_processes=1)


def test_tiny_float_error_is_rounded(tmp_path: Path, import_work: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "src"
    make_published(root)
    quirky = make_mask(dtype=np.float64)
    quirky[quirky == 1] = 1.0000152587890625  # the real data's quirk
    write_nifti(root / "train/subtype0/quiz_0_001.nii.gz", quirky, origin=tuple(o + 2e-4 for o in ORIGIN))

    code, out, err = run_import(capsys, import_work, str(root))

    assert code == 0, err
    label = read(import_work / "nnUNet_raw" / DATASET / "labelsTr/quiz_0_001.nii.gz")
    assert label.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), make_mask())
    # the small origin noise is tolerated, and the label gets the image's exact header
    assert label.GetOrigin() == read(root / "train/subtype0/quiz_0_001_0000.nii.gz").GetOrigin()
    assert "masks rounded to integers: 1 of 9" in out


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("value, message", [
    (1.5, "mask holds non-integer values (1.5)"),
    (3, "mask holds labels 3 outside the declared labels 0..2"),
    (-1, "mask holds negative values (-1)"),
    (np.nan, "mask holds 1 non-finite voxels (NaN)"),
])
def test_bad_mask_values_are_named(tmp_path: Path, import_work: Path, capsys: pytest.CaptureFixture,
                                   value: float, message: str) -> None:
    root = tmp_path / "src"
    make_published(root)
    mask = make_mask(dtype=np.float32 if isinstance(value, float) else np.int16)
    mask[0, 0, 0] = value
    write_nifti(root / "train/subtype1/quiz_1_003.nii.gz", mask)
    assert_rejected(capsys, import_work, root, f"train/subtype1/quiz_1_003.nii.gz: {message}",
                    "nothing was written")


def test_nan_in_image(tmp_path: Path, import_work: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "src"
    make_published(root)
    image = make_image(1).astype(np.float32)
    image[1, 2, 3] = np.nan
    image[1, 2, 4] = np.inf
    write_nifti(root / "validation/subtype2/quiz_2_009_0000.nii.gz", image)
    assert_rejected(capsys, import_work, root,
                    "validation/subtype2/quiz_2_009_0000.nii.gz: image holds 2 non-finite voxels (NaN, inf)")


@pytest.mark.parametrize("shape, message", [
    ((2, *SHAPE), "image is 4D (size [16, 16, 8, 2]), expected 3D"),
    (SHAPE[1:], "image is 2D (size [16, 16]), expected 3D"),
])
def test_image_must_be_3d(tmp_path: Path, import_work: Path, capsys: pytest.CaptureFixture,
                          shape: tuple[int, ...], message: str) -> None:
    root = tmp_path / "src"
    make_published(root)
    write_nifti(root / "train/subtype0/quiz_0_002_0000.nii.gz", np.zeros(shape, np.int16))
    assert_rejected(capsys, import_work, root, f"train/subtype0/quiz_0_002_0000.nii.gz: {message}")


@pytest.mark.parametrize("change, message", [
    ({"spacing": (0.75, 0.75, 2.5)}, "spacing [0.75, 0.75, 2.5] differs from the image's [0.75, 0.75, 2]"),
    ({"origin": (10.0, -20.0, 31.0)}, "origin [10, -20, 31] differs from the image's [10, -20, 30]"),
    ({"direction": (-1, 0, 0, 0, -1, 0, 0, 0, 1)}, "direction [-1, 0, 0, 0, -1, 0, 0, 0, 1] differs"),
    ({"array": np.zeros((8, 16, 15), np.uint8)}, "size [15, 16, 8] differs from the image's [16, 16, 8]"),
])
def test_geometry_mismatch(tmp_path: Path, import_work: Path, capsys: pytest.CaptureFixture,
                           change: dict, message: str) -> None:
    root = tmp_path / "src"
    make_published(root)
    array = change.pop("array", make_mask())
    write_nifti(root / "train/subtype2/quiz_2_005.nii.gz", array, **change)
    assert_rejected(capsys, import_work, root, f"train/subtype2/quiz_2_005.nii.gz: {message}")


def test_subtype_folder_and_name_disagree(tmp_path: Path, import_work: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "src"
    make_published(root)
    for name in ("quiz_0_001.nii.gz", "quiz_0_001_0000.nii.gz"):
        (root / "train/subtype0" / name).rename(root / "train/subtype1" / name)
    assert_rejected(capsys, import_work, root,
                    "train/subtype1/quiz_0_001.nii.gz: subtype 0 in the file name disagrees with the folder subtype1",
                    "train/subtype1/quiz_0_001_0000.nii.gz: subtype 0 in the file name disagrees")


def test_duplicate_case_ids(tmp_path: Path, import_work: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "src"
    make_published(root)
    add_case(root, "validation", 0, 1)  # quiz_0_001 is a training case too
    assert_rejected(capsys, import_work, root, "duplicate case id quiz_0_001: train/subtype0/quiz_0_001_0000.nii.gz "
                                               "and validation/subtype0/quiz_0_001_0000.nii.gz")


@pytest.mark.parametrize("remove, message", [
    ("quiz_1_004.nii.gz", "train/subtype1/quiz_1_004_0000.nii.gz: image without mask (expected quiz_1_004.nii.gz"),
    ("quiz_1_004_0000.nii.gz", "train/subtype1/quiz_1_004.nii.gz: mask without image (expected "
                               "quiz_1_004_0000.nii.gz"),
])
def test_missing_partner(tmp_path: Path, import_work: Path, capsys: pytest.CaptureFixture,
                         remove: str, message: str) -> None:
    root = tmp_path / "src"
    make_published(root)
    (root / "train/subtype1" / remove).unlink()
    assert_rejected(capsys, import_work, root, message)


def test_unknown_files_are_errors_hidden_files_ignored(tmp_path: Path, import_work: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "src"
    make_published(root)
    (root / "train/subtype0/notes.txt").write_text("x")
    (root / "train/subtype0/.DS_Store").write_text("x")
    (root / "test/quiz_0_001_0000.nii.gz").write_text("x")
    (root / "validation/extra").mkdir()
    err = assert_rejected(capsys, import_work, root,
                          "train/subtype0/notes.txt: unexpected file", "test/quiz_0_001_0000.nii.gz: unexpected file",
                          "validation/extra: unexpected entry")
    assert ".DS_Store" not in err


def test_missing_and_empty_split_folders(tmp_path: Path, import_work: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "src"
    make_published(root)
    shutil.rmtree(root / "validation")
    for f in (root / "train/subtype2").iterdir():
        f.unlink()
    assert_rejected(capsys, import_work, root, "validation: missing split folder", "train/subtype2: empty folder")


def test_unreadable_file_and_all_problems_at_once(tmp_path: Path, import_work: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "src"
    make_published(root)
    (root / "train/subtype0/quiz_0_002_0000.nii.gz").write_bytes(b"not a nifti")
    write_nifti(root / "validation/subtype0/quiz_0_007.nii.gz", make_mask().astype(np.float32) * 0.5)
    (root / "train/subtype2/quiz_2_006.nii.gz").unlink()
    err = assert_rejected(capsys, import_work, root, "3 problem(s)",
                          "train/subtype0/quiz_0_002_0000.nii.gz: is not a NIfTI file",
                          "validation/subtype0/quiz_0_007.nii.gz: mask holds non-integer values (0.5)",
                          "train/subtype2/quiz_2_006_0000.nii.gz: image without mask")
    assert "Traceback" not in err


def test_existing_target_needs_force(tmp_path: Path, import_work: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "src"
    make_published(root)
    target = import_work / "nnUNet_raw" / DATASET
    target.mkdir(parents=True)
    (target / "old.txt").write_text("keep me")

    code, _, err = run_import(capsys, import_work, str(root))
    assert code == 2 and f"{target}: dataset exists already (use --force" in err
    assert sorted(p.name for p in target.parent.iterdir()) == [DATASET] and (target / "old.txt").exists()

    code, _, err = run_import(capsys, import_work, str(root), "--force")
    assert code == 0, err
    assert not (target / "old.txt").exists() and (target / "dataset.json").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == [DATASET]


def test_same_id_other_name_is_refused(tmp_path: Path, import_work: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "src"
    make_published(root)
    (import_work / "nnUNet_raw/Dataset007_Other").mkdir(parents=True)
    code, _, err = run_import(capsys, import_work, str(root), "--force")
    assert code == 2 and "dataset id 7 is taken by another dataset" in err


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_an_import_removes_what_killed_imports_left(tmp_path: Path, import_work: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """kill -9 leaves a hidden .Dataset<NNN>_*.importing-<host>-<pid>-* folder; a later import removes those of
    dead processes of this host and leaves a running import's folder alone."""
    from nnunet_mtl.tempfiles import owner_tag

    root = tmp_path / "src"
    make_published(root)
    raw = import_work / "nnUNet_raw"
    dead = raw / f".{DATASET}.{owner_tag('importing').rsplit('-', 1)[0]}-{dead_pid()}-abc"
    (dead / "imagesTr").mkdir(parents=True)
    (dead / "imagesTr" / "quiz_0_001_0000.nii.gz").write_bytes(b"half")
    running = raw / f".Dataset008_Other.{owner_tag('importing')}-xyz"
    running.mkdir()
    code, _, err = run_import(capsys, import_work, str(root))
    assert code == 0, err
    assert not dead.exists() and running.exists()
    assert f"removed {dead.name}" in err
    assert sorted(p.name for p in raw.iterdir()) == sorted([DATASET, running.name])


def test_a_case_number_under_two_subtypes(tmp_path: Path, import_work: Path, capsys: pytest.CaptureFixture) -> None:
    """The published data never repeats a number: a warning; the same image under both subtypes: an error."""
    root = tmp_path / "src"
    make_published(root)
    add_case(root, "train", 1, 1)  # quiz_1_001 beside quiz_0_001 (same image: both are seeded by the number)
    write_nifti(root / "train/subtype1/quiz_1_001_0000.nii.gz", make_image(1001))
    code, _, err = run_import(capsys, import_work, str(root))
    assert code == 0, err
    assert ("warning: case number 001 appears under several subtypes: train/subtype0/quiz_0_001_0000.nii.gz and "
            "train/subtype1/quiz_1_001_0000.nii.gz") in err
    shutil.copyfile(root / "train/subtype0/quiz_0_001_0000.nii.gz", root / "train/subtype1/quiz_1_001_0000.nii.gz")
    code, _, err = run_import(capsys, import_work, str(root), "--force")
    assert code == 2 and "case number 001 appears under several subtypes with the same image" in err


def test_ctrl_c_during_import_says_nothing_was_kept(tmp_path: Path, import_work: Path,
                                                    capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "src"
    make_published(root)
    original = importer._Writer.case
    calls = []

    def interrupted(self, case):
        calls.append(case.case_id)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(self, case)

    monkeypatch.setattr(importer._Writer, "case", interrupted)
    code, _, err = run_import(capsys, import_work, str(root))
    assert code == 130
    assert "interrupted; nothing was written (import is all or nothing): run it again" in err
    assert "finished work is kept" not in err
    assert not import_work.exists()  # no temporary dataset folder, no empty nnUNet_* folders


# --------------------------------------------------------------------------------------------- generic layout


def make_generic(root: Path, rows: list[tuple[str, str, str]], header: str = "case,class,split") -> None:
    for i, (case, _, _) in enumerate(rows):
        write_nifti(root / "images" / f"{case}_0000.nii.gz", make_image(i))
        write_nifti(root / "masks" / f"{case}.nii.gz", make_mask())
    columns = len(header.split(","))
    lines = [header, *(",".join(row[:columns]) for row in rows)]
    (root / "classes.csv").write_text("\n".join(lines) + "\n")


def test_generic_layout_with_string_classes(tmp_path: Path, import_work: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [(f"kid{i:02d}", ["malignant", "benign"][i % 2], "validation" if i >= 8 else "train") for i in range(10)]
    make_generic(tmp_path, rows)
    write_nifti(tmp_path / "test" / "new01.nii.gz", make_image(99))
    argv = ["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"), "--classes",
            str(tmp_path / "classes.csv"), "--test-images", str(tmp_path / "test"), "--name", "Kidney",
            "--labels", "background,kidney,tumour"]

    code, out, err = run_import(capsys, import_work, *argv)

    assert code == 0, err
    target = import_work / "nnUNet_raw/Dataset007_Kidney"
    dataset = json.loads((target / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "kidney": 1, "tumour": 2}
    assert dataset["subtype_names"] == {"0": "benign", "1": "malignant"}
    assert dataset["case_subtypes"] == {case: int(label == "malignant") for case, label, _ in rows}
    assert (target / "imagesTs/new01_0000.nii.gz").exists()
    splits = json.loads((target / "splits_final.json").read_text())
    assert splits[0] == {"train": [f"kid{i:02d}" for i in range(8)], "val": ["kid08", "kid09"]}
    assert len(splits) == 1 + 4  # 4 cases per class in train allow 4 stratified folds
    assert "too few training cases for 5 folds: made 4" in err
    assert "benign" in out and "malignant" in out

    assert run_import(capsys, import_work, *argv)[0] == 2  # exists already
    assert run_import(capsys, import_work, str(tmp_path), *argv)[0] == 2  # both layouts at once
    assert main(["import", "--images", "x", "--dataset-id", "7", "--workdir", str(import_work)]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["import", str(tmp_path)])  # --dataset-id missing: argparse's own usage error
    assert exit_info.value.code == 2


def test_generic_layout_problems(tmp_path: Path, import_work: Path, capsys: pytest.CaptureFixture) -> None:
    make_generic(tmp_path, [("a", "0", ""), ("b", "1", ""), ("c", "1", "")], header="case,class")
    write_nifti(tmp_path / "images" / "a.nii.gz", make_image(5))  # a second image for case a
    write_nifti(tmp_path / "images" / "d_0000.nii.gz", make_image(6))  # no row, no mask
    (tmp_path / "masks" / "c.nii.gz").unlink()
    with open(tmp_path / "classes.csv", "a") as f:
        f.write("e,0\n")
    source = importer.scan_generic(tmp_path / "images", tmp_path / "masks", tmp_path / "classes.csv")
    with pytest.raises(importer.DatasetImportError) as error:
        importer.import_dataset(source, import_work, 7, progress=False)
    assert error.value.problems == [
        "images/a_0000.nii.gz: duplicate case id a (also images/a.nii.gz)",
        "images/c_0000.nii.gz: image without mask (expected c.nii.gz in masks)",
        "images/d_0000.nii.gz: case d has no row in classes.csv",
        "classes.csv: case e has neither image nor mask",
    ]
    assert not import_work.exists() or list(import_work.iterdir()) == []


@pytest.mark.parametrize("table, message", [
    (b"id,label\na,0\n", "classes.csv: header must be case,class or case,class,split, found id,label"),
    (b"", "classes.csv: header must be case,class or case,class,split, found nothing"),
    (b"case,class\na,0,train\nb,1\nc,1\n", "classes.csv: line 2: 3 columns, expected 2"),
    (b"case,class\na,\nb,1\nc,1\n", "classes.csv: line 2: empty case or class"),
    (b"case,class,split\na,0,test\nb,1,train\nc,1,train\n",
     "classes.csv: line 2: split 'test' is neither train nor validation"),
    (b"case,class\na,0\nb,1\nc,1\na,1\n", "classes.csv: line 5: duplicate case id a"),
    (b"case,class\na,\xff\n", "classes.csv: cannot read the class table"),
])
def test_malformed_classes_csv_is_named(tmp_path: Path, import_work: Path, capsys: pytest.CaptureFixture,
                                        table: bytes, message: str) -> None:
    make_generic(tmp_path, [("a", "0", ""), ("b", "1", ""), ("c", "1", "")], header="case,class")
    (tmp_path / "classes.csv").write_bytes(table)
    code, _, err = run_import(capsys, import_work, "--images", str(tmp_path / "images"), "--masks",
                              str(tmp_path / "masks"), "--classes", str(tmp_path / "classes.csv"))
    assert code == 2 and message in err, err
    assert not (import_work / "nnUNet_raw").exists() or list((import_work / "nnUNet_raw").iterdir()) == []


def test_generic_without_split_column_uses_first_fold(tmp_path: Path) -> None:
    make_generic(tmp_path, [(f"c{i}", str(i % 2), "") for i in range(10)], header="case,class")
    source = importer.scan_generic(tmp_path / "images", tmp_path / "masks", tmp_path / "classes.csv")
    report = importer.import_dataset(source, tmp_path / "raw", 7, progress=False)
    splits = json.loads((report.target / "splits_final.json").read_text())
    assert len(splits) == 6 and splits[0] == splits[1]
    assert json.loads((report.target / "dataset.json").read_text())["subtype_names"] == {"0": "0", "1": "1"}


def test_real_ct_keeps_geometry_and_voxels(tmp_path: Path, import_work: Path, capsys: pytest.CaptureFixture) -> None:
    """A real CT through the generic layout: the imported pair must be the original grid and voxels exactly."""
    ct = read(REAL_CT / "example_ct.nii.gz")
    seg = read(REAL_CT / "example_seg.nii.gz")
    pancreas = (sitk.GetArrayFromImage(seg) == 10).astype(np.uint8)
    assert pancreas.sum() == 818
    write_volume(tmp_path / "masks/ct1.nii.gz", pancreas, reference=seg)
    (tmp_path / "images").mkdir()
    shutil.copyfile(REAL_CT / "example_ct.nii.gz", tmp_path / "images/ct1_0000.nii.gz")
    (tmp_path / "classes.csv").write_text("case,class\nct1,none\n")

    code, _, err = run_import(capsys, import_work, "--images", str(tmp_path / "images"), "--masks",
                              str(tmp_path / "masks"), "--classes", str(tmp_path / "classes.csv"),
                              "--labels", "background,pancreas", "--name", "RealCT")

    assert code == 0, err
    assert "1 training case(s) allow no cross-validation" in err
    target = import_work / "nnUNet_raw/Dataset007_RealCT"
    image, label = read(target / "imagesTr/ct1_0000.nii.gz"), read(target / "labelsTr/ct1.nii.gz")
    assert geometry(image) == geometry(ct) == geometry(label)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(ct))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), pancreas)
    assert label.GetPixelID() == sitk.sitkUInt8
    dataset = json.loads((target / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "pancreas": 1} and dataset["case_subtypes"] == {"ct1": 0}


# ------------------------------------------------------------------------------------------------ API pieces


def test_make_splits_is_seeded_and_keeps_validation_out() -> None:
    subtypes = {f"c{i:02d}": i % 3 for i in range(33)}
    splits, notes = importer.make_splits(subtypes, ["c00", "c01", "c02"], seed=1)
    assert splits == importer.make_splits(subtypes, ["c00", "c01", "c02"], seed=1)[0]
    assert splits != importer.make_splits(subtypes, ["c00", "c01", "c02"], seed=2)[0]
    assert notes == [] and len(splits) == 6
    for fold in splits[1:]:
        assert not {"c00", "c01", "c02"} & (set(fold["train"]) | set(fold["val"]))
        assert Counter(subtypes[c] for c in fold["val"]) == {0: 2, 1: 2, 2: 2}


def test_cli_defaults_match_the_importer() -> None:
    args = build_parser().parse_args(["import", "x", "--dataset-id", "1"])
    assert args.func is cli_data.run_import
    assert (args.name, args.labels.split(","), args.channel_name, args.folds, args.seed) == (
        importer.DEFAULT_NAME, list(importer.DEFAULT_LABELS), importer.DEFAULT_CHANNEL, importer.DEFAULT_FOLDS,
        importer.DEFAULT_SEED)
