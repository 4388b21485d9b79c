"""Hostile but realistic inputs beyond the corruption matrix: case names that need CSV quoting, a finished mask
damaged before a re-run, damaged checkpoints, leftovers and wrong subtypes in evaluate."""

from __future__ import annotations

import csv
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from volumes import crop_phantom_test_images

from nnunet_mtl.cli import main

NAMES = ["case,a", 'quote"b', "space c", "ünïcødé"]


def run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def awkward_images(tiny_dataset, tmp_path_factory) -> Path:
    """Cropped phantom test images under names with a comma, a quote, a space and non-ASCII letters."""
    root = tmp_path_factory.mktemp("awkward")
    cases = crop_phantom_test_images(tiny_dataset, root / "crops")
    images = root / "images"
    images.mkdir()
    for name, case in zip(NAMES, cases + cases[:1]):
        shutil.copyfile(root / "crops" / f"{case}_0000.nii.gz", images / f"{name}_0000.nii.gz")
    return images


def test_case_names_round_trip_through_predict_submission_check_and_evaluate(awkward_images, tiny_model,
                                                                            tmp_path, capsys):
    out = tmp_path / "preds"
    predict = ["predict", "-i", awkward_images, "-o", out, "-m", tiny_model, "--fast", "--device", "cpu"]
    assert run(capsys, *predict)[0] == 0
    with open(out / "subtype_results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Names", "Subtype"] and sorted(r[0] for r in rows[1:]) == sorted(f"{n}.nii.gz" for n in NAMES)
    assert '"case,a.nii.gz"' in (out / "subtype_results.csv").read_text(encoding="utf-8")  # quoted, not split
    with open(out / "subtype_probabilities.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))  # Names, Subtype, 3 probabilities, 3 lesion columns: a comma splits nothing
    assert len(rows) == len(NAMES) + 1 and all(len(row) == 8 for row in rows)

    code, stdout, _ = run(capsys, *predict)  # run again: every case is kept, nothing crashes
    assert code == 0 and "predicted 0, kept 4" in stdout

    zip_path = tmp_path / "results.zip"
    assert run(capsys, "submission", out, "--zip", zip_path)[0] == 0
    with zipfile.ZipFile(zip_path) as zf:
        assert sorted(zf.namelist()) == sorted([f"{n}.nii.gz" for n in NAMES] + ["subtype_results.csv"])
    code, stdout, _ = run(capsys, "check-submission", zip_path, "--images", awkward_images)
    assert code == 0 and "valid" in stdout

    truth = tmp_path / "truth"
    truth.mkdir()
    for name in NAMES:
        shutil.copyfile(out / f"{name}.nii.gz", truth / f"{name}.nii.gz")
    shutil.copyfile(out / "subtype_results.csv", truth / "subtype_results.csv")
    code, _, err = run(capsys, "evaluate", "--pred", out, "--truth", truth, "--out", tmp_path / "metrics")
    assert code == 0, err
    with open(tmp_path / "metrics" / "metrics_per_case.csv", newline="", encoding="utf-8") as f:
        per_case = list(csv.DictReader(f))
    assert sorted(r["case"] for r in per_case) == sorted(NAMES)
    assert all(float(r["dice_pancreas"]) == 1.0 for r in per_case)


def test_a_finished_mask_damaged_before_a_rerun_is_predicted_again(awkward_images, tiny_model, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copyfile(awkward_images / "space c_0000.nii.gz", images / "a_0000.nii.gz")
    shutil.copyfile(awkward_images / "case,a_0000.nii.gz", images / "b_0000.nii.gz")
    out = tmp_path / "out"
    predict = ["predict", "-i", images, "-o", out, "-m", tiny_model, "--fast", "--device", "cpu"]
    assert run(capsys, *predict)[0] == 0
    intact = (out / "a.nii.gz").read_bytes()
    (out / "a.nii.gz").write_bytes(intact[: len(intact) // 2])  # cut short after it was finished
    code, stdout, err = run(capsys, *predict)
    assert code == 0 and "predicted 1, kept 1" in stdout
    assert "a.nii.gz: is cut short" in err and "predicting a again" in err
    assert (out / "a.nii.gz").read_bytes() == intact


@pytest.mark.parametrize("damage", ["empty", "cut", "not a checkpoint"])
def test_a_damaged_checkpoint_is_named_with_the_others_of_its_folder(tiny_model, awkward_images, tmp_path, capsys,
                                                                     damage):
    model = tmp_path / "model"
    (model / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(tiny_model / name, model / name)
    for checkpoint in (tiny_model / "fold_0").glob("checkpoint_*.pth"):
        shutil.copyfile(checkpoint, model / "fold_0" / checkpoint.name)
    final = model / "fold_0" / "checkpoint_final.pth"
    others = sorted(p.name for p in final.parent.glob("checkpoint_*.pth") if p != final)
    assert others, "the tiny model should hold a best checkpoint beside the final one"
    data = final.read_bytes()
    final.write_bytes({"empty": b"", "cut": data[: len(data) // 3], "not a checkpoint": b"<html>404</html>"}[damage])
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    shutil.copyfile(awkward_images / "space c_0000.nii.gz", images / "a_0000.nii.gz")
    code, _, err = run(capsys, "predict", "-i", images, "-o", out, "-m", model, "--device", "cpu")
    assert code == 2
    assert f"{final}: damaged or not a checkpoint ({final.stat().st_size} bytes" in err
    assert f"the folder also holds {', '.join(others)}: choose one with --checkpoint NAME" in err
    assert not out.exists()
    code, _, err = run(capsys, "predict", "-i", images, "-o", out, "-m", model, "--device", "cpu", "--fast",
                       "--checkpoint", others[0])
    assert code == 0, err


def evaluation_folders(root: Path) -> tuple[Path, Path]:
    pred, truth = root / "pred", root / "truth"
    for folder in (pred, truth):
        folder.mkdir(parents=True)
        for case in ("quiz_001", "quiz_002"):
            mask = np.zeros((4, 8, 8), np.uint8)
            mask[1:3, 2:6, 2:6] = 1
            sitk.WriteImage(sitk.GetImageFromArray(mask), str(folder / f"{case}.nii.gz"))
        (folder / "subtype_results.csv").write_text("Names,Subtype\nquiz_001.nii.gz,0\nquiz_002.nii.gz,1\n")
    return pred, truth


def test_evaluate_ignores_hidden_leftovers(tmp_path, capsys):
    pred, truth = evaluation_folders(tmp_path)
    shutil.copyfile(pred / "quiz_001.nii.gz", pred / ".quiz_003.tmp.nii.gz")  # what a killed writer leaves
    code, stdout, err = run(capsys, "evaluate", "--pred", pred, "--truth", truth)
    assert code == 0, err
    assert stdout.startswith("2 cases")


def test_evaluate_names_the_case_of_an_out_of_range_subtype(tmp_path, capsys):
    pred, truth = evaluation_folders(tmp_path)
    (pred / "subtype_results.csv").write_text("Names,Subtype\nquiz_001.nii.gz,0\nquiz_002.nii.gz,-1\n")
    code, _, err = run(capsys, "evaluate", "--pred", pred, "--truth", truth)
    assert code == 2
    assert f"subtypes outside 0 or more: quiz_002 = -1 in {pred / 'subtype_results.csv'}" in err
    (pred / "subtype_results.csv").write_text("Names,Subtype\nquiz_001.nii.gz,0\nquiz_002.nii.gz,7\n")
    (pred / "subtype_probabilities.csv").write_text("Names,Subtype,prob_0,prob_1\nquiz_001.nii.gz,0,0.9,0.1\n"
                                                    "quiz_002.nii.gz,1,0.2,0.8\n")
    code, _, err = run(capsys, "evaluate", "--pred", pred, "--truth", truth)
    assert code == 2 and f"subtypes outside 0..1: quiz_002 = 7 in {pred / 'subtype_results.csv'}" in err


def test_resuming_from_a_damaged_checkpoint_names_it(tiny_env, tiny_model, capsys):
    from tiny import TINY_DATASET_ID, TINY_PLANS

    fold = tiny_model / "fold_3"
    fold.mkdir()
    try:
        (fold / "checkpoint_latest.pth").write_bytes(b"")
        shutil.copyfile(tiny_model / "fold_0" / "checkpoint_best.pth", fold / "checkpoint_best.pth")
        code, _, err = run(capsys, "train", TINY_DATASET_ID, "--plans", TINY_PLANS, "--fold", 3, "--device", "cpu",
                           "--resume", "--workdir", tiny_env["workdir"])
        assert code == 2
        assert f"{fold / 'checkpoint_latest.pth'}: damaged or not a checkpoint (0 bytes" in err
        assert "the folder also holds checkpoint_best.pth: move the damaged one away to resume from another" in err
    finally:
        shutil.rmtree(fold)
