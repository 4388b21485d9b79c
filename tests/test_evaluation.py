"""The folder evaluation (`nnunet-mtl evaluate`): every per-case number equals a direct computation on the files,
the summaries and tables it writes, and its refusals of mismatched inputs, naming the cases."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from sklearn import metrics as skm
from volumes import SHAPE, SPACING_ZYX, make_synthetic_set, write_csv, write_volume

from nnunet_mtl.cli import main
from nnunet_mtl.evaluation.evaluate import EvaluationError, evaluate_folder, format_summary
from nnunet_mtl.evaluation.metrics import SEGMENTATION_METRICS, segmentation_metrics


def read_per_case_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_mask_folder_writes_metrics_and_per_case_csv(tmp_path):
    folders = make_synthetic_set(tmp_path, n_cases=6)
    summary = evaluate_folder(folders["pred"], folders["truth"], images_dir=folders["images"], tolerance_mm=1.5)
    written = json.loads((folders["pred"] / "metrics.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["n_cases"] == 6 and written["tolerance_mm"] == 1.5
    assert written["sources"]["images"] == str(folders["images"].resolve())
    assert written["sources"]["truth_masks"] == str(folders["truth"].resolve())
    assert written["sources"]["probabilities"].endswith("subtype_probabilities.csv")
    rows = read_per_case_csv(folders["pred"] / "metrics_per_case.csv")
    assert [r["case"] for r in rows] == [f"quiz_{i:03d}" for i in range(6)]
    assert {"prob_0", "prob_2", "subtype_true", "subtype_pred"} <= set(rows[0])

    # every per-case number equals a direct computation on the files
    for row in rows:
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(folders["truth"] / f"{row['case']}.nii.gz")))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(folders["pred"] / f"{row['case']}.nii.gz")))
        direct = segmentation_metrics(pred, truth, SPACING_ZYX, 1.5)
        for metric in SEGMENTATION_METRICS:
            assert float(row[metric]) == pytest.approx(direct[metric])
    for metric in SEGMENTATION_METRICS:
        values = [float(r[metric]) for r in rows]
        assert written["segmentation"][metric]["mean"] == pytest.approx(np.mean(values))
        assert written["segmentation"][metric]["median"] == pytest.approx(np.median(values))
    y_true = [int(r["subtype_true"]) for r in rows]
    y_pred = [int(r["subtype_pred"]) for r in rows]
    assert written["classification"]["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred).tolist()
    assert written["classification"]["macro"]["f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    assert [t["metric"] for t in written["targets"]] == ["dice_pancreas", "dice_lesion", "macro_f1"]
    text = format_summary(summary)
    assert "Dice whole pancreas" in text and "confusion matrix" in text

    # lesion-wise: per case counts from independent flood-fill components, per-lesion rows, printed lines
    from test_lesions import flood_components

    lesions = written["lesions"]
    per_lesion = read_per_case_csv(folders["pred"] / "metrics_per_lesion.csv")
    for row in rows:
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(folders["truth"] / f"{row['case']}.nii.gz")))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(folders["pred"] / f"{row['case']}.nii.gz")))
        assert int(row["true_lesions"]) == len(flood_components(truth == 2))
        mine = [r for r in per_lesion if r["case"] == row["case"]]
        assert sum(r["kind"] == "predicted" for r in mine) == len(flood_components(pred == 2))
        assert int(row["false_positive_lesions"]) == sum(r["status"] == "false_positive" for r in mine)
    assert lesions["false_positives"]["total"] == 2 and lesions["false_positives"]["by_location"]["outside"] == 2
    assert lesions["n_detected"] == sum(r["status"] == "detected" for r in per_lesion) > 0
    assert lesions["froc"]["fp_per_case"][-1] == pytest.approx(2 / 6) and lesions["presence_auc"] is None
    assert "lesion sensitivity by size" in text and "false-positive lesions: 2 (0.33 per case" in text


def write_raw_dataset(root: Path, folders: dict[str, Path], val: list[str]) -> Path:
    """The same cases as an nnU-Net raw dataset with subtypes in dataset.json and a two-fold split."""
    raw = root / "Dataset500_Test"
    (raw / "labelsTr").mkdir(parents=True)
    (raw / "imagesTr").mkdir()
    cases = sorted(p.name[:-7] for p in folders["truth"].glob("*.nii.gz"))
    subtypes = {}
    with open(folders["truth"] / "subtype_results.csv") as f:
        for row in list(csv.reader(f))[1:]:
            subtypes[row[0][:-7]] = int(row[1])
    for case in cases:
        (raw / "labelsTr" / f"{case}.nii.gz").write_bytes((folders["truth"] / f"{case}.nii.gz").read_bytes())
        (raw / "imagesTr" / f"{case}_0000.nii.gz").write_bytes(
            (folders["images"] / f"{case}_0000.nii.gz").read_bytes())
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "pancreas": [1, 2], "lesion": 2},
               "numTraining": len(cases), "file_ending": ".nii.gz", "case_subtypes": subtypes,
               "subtype_names": {"0": "solid", "1": "cystic", "2": "enhancing"}}
    (raw / "dataset.json").write_text(json.dumps(dataset))
    other = [c for c in cases if c not in val]
    (raw / "splits_final.json").write_text(json.dumps([{"train": other, "val": val}, {"train": val, "val": other}]))
    return raw


def test_evaluate_nnunet_raw_dataset_uses_validation_fold(tmp_path):
    folders = make_synthetic_set(tmp_path, n_cases=6)
    val = ["quiz_001", "quiz_002", "quiz_004"]
    raw = write_raw_dataset(tmp_path, folders, val)
    for p in folders["pred"].glob("quiz_*.nii.gz"):
        if p.name[:-7] not in val:
            p.unlink()
    for name in ("subtype_results.csv", "subtype_probabilities.csv", "lesion_candidates.csv"):
        with open(folders["pred"] / name) as f:
            header, *rows = list(csv.reader(f))
        write_csv(folders["pred"] / name, header, [r for r in rows if r[0][:-7] in val])
    summary = evaluate_folder(folders["pred"], raw, fold=0, out_dir=tmp_path / "out")
    assert [r["case"] for r in summary["per_case"]] == val
    assert summary["classification"]["class_names"] == ["solid", "cystic", "enhancing"]
    assert summary["sources"]["images"] == str((raw / "imagesTr").resolve())
    assert summary["sources"]["fold"] == 0 and summary["sources"]["truth_mode"] == "nnunet_raw"
    assert (tmp_path / "out" / "metrics.json").is_file()
    with pytest.raises(EvaluationError, match="missing: quiz_000, quiz_003, quiz_005"):
        evaluate_folder(folders["pred"], raw, fold=1)
    with pytest.raises(EvaluationError, match="fold 5 does not exist"):
        evaluate_folder(folders["pred"], raw, fold=5)


def test_missing_and_mismatched_cases_are_named(tmp_path):
    folders = make_synthetic_set(tmp_path, n_cases=4, probabilities=False)
    (folders["pred"] / "quiz_002.nii.gz").unlink()
    with pytest.raises(EvaluationError, match=r"1 case\(s\) missing: quiz_002"):
        evaluate_folder(folders["pred"], folders["truth"])
    (folders["pred"] / "quiz_002.nii.gz").write_bytes((folders["truth"] / "quiz_002.nii.gz").read_bytes())
    (folders["pred"] / "quiz_002.nii.gz").rename(folders["pred"] / "quiz_02.nii.gz")
    with pytest.raises(EvaluationError, match=r"missing: quiz_002; 1 case\(s\) not in the truth: quiz_02"):
        evaluate_folder(folders["pred"], folders["truth"])
    (folders["pred"] / "quiz_02.nii.gz").rename(folders["pred"] / "quiz_002.nii.gz")
    with pytest.raises(EvaluationError, match="images <case>_0000.nii.gz of: quiz_000"):
        evaluate_folder(folders["pred"], folders["truth"], images_dir=tmp_path / "nowhere")
    write_csv(folders["pred"] / "subtype_results.csv", ["Names", "Subtype"],
              [["quiz_000.nii.gz", 0], ["quiz_001.nii.gz", 1], ["quiz_002.nii.gz", 2]])
    with pytest.raises(EvaluationError, match="predicted subtypes .* missing: quiz_003"):
        evaluate_folder(folders["pred"], folders["truth"])


def test_csv_format_errors(tmp_path):
    folders = make_synthetic_set(tmp_path, n_cases=3, probabilities=False)
    write_csv(folders["pred"] / "subtype_results.csv", ["Name", "Subtype"],
              [[f"quiz_{i:03d}.nii.gz", 0] for i in range(3)])
    with pytest.raises(EvaluationError, match="expected exactly 'Names,Subtype'"):
        evaluate_folder(folders["pred"], folders["truth"])
    write_csv(folders["pred"] / "subtype_results.csv", ["Names", "Subtype"],
              [["quiz_000_0000.nii.gz", 0], ["quiz_001.nii.gz", 1], ["quiz_001.nii.gz", 2]])
    with pytest.raises(EvaluationError, match="quiz_001 listed twice"):
        evaluate_folder(folders["pred"], folders["truth"])
    (folders["pred"] / "subtype_results.csv").unlink()
    with pytest.raises(EvaluationError, match="subtype_results.csv is missing"):
        evaluate_folder(folders["pred"], folders["truth"])


def test_geometry_mismatch_names_the_case(tmp_path):
    folders = make_synthetic_set(tmp_path, n_cases=3, probabilities=False)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folders["pred"] / "quiz_001.nii.gz")))
    write_volume(folders["pred"] / "quiz_001.nii.gz", labels, spacing_zyx=(2.0, 0.8, 0.7))
    write_volume(folders["pred"] / "quiz_002.nii.gz", labels, spacing_zyx=SPACING_ZYX, origin=(5.0, 0.0, 0.0))
    with pytest.raises(EvaluationError, match=r"geometry differs for 2 case\(s\): quiz_001: prediction spacing"
                                              r".* \| quiz_002: prediction origin"):
        evaluate_folder(folders["pred"], folders["truth"])
    write_volume(folders["pred"] / "quiz_001.nii.gz", labels[:, :-1], spacing_zyx=SPACING_ZYX)
    with pytest.raises(EvaluationError, match="quiz_001: prediction size"):
        evaluate_folder(folders["pred"], folders["truth"])


def test_float_masks_are_rounded_and_bad_labels_rejected(tmp_path):
    folders = make_synthetic_set(tmp_path, n_cases=3, probabilities=False)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(folders["truth"] / "quiz_000.nii.gz")))
    # the real data's quirk: 1 stored as 1.0000152587890625
    write_volume(folders["truth"] / "quiz_000.nii.gz", np.where(truth == 1, 1.0000152587890625, truth).astype(
        np.float32), spacing_zyx=SPACING_ZYX)
    summary = evaluate_folder(folders["pred"], folders["truth"])
    assert summary["n_cases"] == 3
    write_volume(folders["pred"] / "quiz_001.nii.gz", np.full(SHAPE, 3, np.uint8), spacing_zyx=SPACING_ZYX)
    with pytest.raises(EvaluationError, match=r"quiz_001.nii.gz: labels \[3\]"):
        evaluate_folder(folders["pred"], folders["truth"])


def test_truth_without_subtypes_evaluates_segmentation_only(tmp_path):
    folders = make_synthetic_set(tmp_path, n_cases=2, probabilities=False)
    (folders["truth"] / "subtype_results.csv").rename(tmp_path / "truth_subtypes.csv")
    summary = evaluate_folder(folders["pred"], folders["truth"])
    assert summary["classification"] is None and "classification was not evaluated" in summary["notes"][0]
    summary = evaluate_folder(folders["pred"], folders["truth"], subtypes_csv=tmp_path / "truth_subtypes.csv")
    assert summary["classification"]["n_cases"] == 2


def test_candidates_that_do_not_fit_the_masks_are_refused(tmp_path, capsys):
    folders = make_synthetic_set(tmp_path, n_cases=3)
    table = folders["pred"] / "lesion_candidates.csv"
    lines = table.read_text().splitlines()
    row = lines[1].split(",")
    row[4:7] = ["0", "0", "0"]  # the peak voxel of the first component moved to the corner: no lesion there
    table.write_text("\n".join([lines[0], ",".join(row), *lines[2:]]) + "\n")
    with pytest.raises(EvaluationError, match=f"{row[0][:-7]}: .*lesion_candidates.csv does not fit its mask"):
        evaluate_folder(folders["pred"], folders["truth"])
    table.write_text("\n".join([lines[0], *lines[2:]]) + "\n")  # a component left without a score
    assert main(["evaluate", "--pred", str(folders["pred"]), "--truth", str(folders["truth"])]) == 2
    assert "have no score" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:  # argparse's exit for a malformed option
        main(["evaluate", "--pred", str(folders["pred"]), "--truth", str(folders["truth"]), "--lesion-bins", "1,0.5"])
    assert error.value.code == 2 and "increasing positive volumes" in capsys.readouterr().err
    table.unlink()  # no table: lesion-wise numbers without FROC, and a note saying why
    summary = evaluate_folder(folders["pred"], folders["truth"], lesion_size_bins_ml=(1.0,))
    assert summary["lesions"]["froc"] is None and any("lesion_candidates.csv" in n for n in summary["notes"])
    assert [b["bin"] for b in summary["lesions"]["by_size"]] == ["< 1 ml", ">= 1 ml"]


def test_cli_evaluate_prints_table_and_fails_with_exit_2(tmp_path, capsys):
    folders = make_synthetic_set(tmp_path, n_cases=3)
    out = tmp_path / "metrics"
    assert main(["evaluate", "--pred", str(folders["pred"]), "--truth", str(folders["truth"]),
                 "--images", str(folders["images"]), "--tolerance-mm", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Dice lesion" in printed and "macro-F1" in printed
    assert (out / "metrics.json").is_file() and (out / "metrics_per_case.csv").is_file()
    (folders["pred"] / "quiz_001.nii.gz").unlink()
    assert main(["evaluate", "--pred", str(folders["pred"]), "--truth", str(folders["truth"])]) == 2
    assert "quiz_001" in capsys.readouterr().err
