"""The demo's code path end to end on a CI-sized phantom (a couple of iterations), then reuse on a second run; the
summary's verdicts against the README's bars."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from html_checks import assert_self_contained, assert_tables_hold_metrics, decoded_images, parse_page
from sklearn.metrics import accuracy_score, f1_score
from volumes import read_array

from nnunet_mtl.cli import main as cli_main
from nnunet_mtl.demo import DemoResult, format_result
from nnunet_mtl.inference.submission import check_submission

# The bars as the README states them (whole-pancreas Dice, lesion Dice, macro-F1), not read from the code.
README_BARS = {"whole_pancreas_dice": 0.90, "lesion_dice": 0.60, "macro_f1": 0.80}


def verdict(score: float, bar: float) -> str:
    return "met" if score >= bar else "NOT met"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if not a.any() and not b.any() else 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def read_subtypes(path) -> dict[str, int]:
    with open(path, newline="") as f:
        return {row["Names"]: int(row["Subtype"]) for row in csv.DictReader(f)}


def scores_from_files(predictions, truth) -> dict[str, float]:
    """The demo's test numbers recomputed from its masks and tables (numpy and scikit-learn, not our evaluation)."""
    pancreas, lesion = [], []
    for truth_file in sorted(truth.glob("quiz_*.nii.gz")):
        t, p = np.rint(read_array(truth_file)), read_array(predictions / truth_file.name)
        pancreas.append(dice(p > 0, t > 0))
        lesion.append(dice(p == 2, t == 2))
    true, predicted = read_subtypes(truth / "subtype_results.csv"), read_subtypes(predictions / "subtype_results.csv")
    cases = sorted(true)
    y_true, y_pred = [true[c] for c in cases], [predicted[c] for c in cases]
    return {"whole_pancreas_dice": float(np.mean(pancreas)), "lesion_dice": float(np.mean(lesion)),
            "accuracy": accuracy_score(y_true, y_pred),
            "macro_f1": f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro", zero_division=0)}


def test_demo_pipeline_runs_end_to_end_and_reuses_finished_stages(tmp_path, monkeypatch, capsys):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):  # the demo sets them; restored after
        monkeypatch.setenv(var, str(tmp_path / "unused" / var))
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    work = tmp_path / "work"
    options = ["--workdir", str(work), "--epochs", "1", "--iterations", "2", "--train-per-subtype", "1,1,1",
               "--val-per-subtype", "1,1,1", "--test-cases", "3", "--device", "cpu"]
    assert cli_main(["demo", *options]) == 0
    out = capsys.readouterr().out
    assert "nnunet-mtl demo summary" in out and "time per stage" in out
    predictions = work / "demo_predictions"
    summary = json.loads((work / "demo_summary.json").read_text())
    measured = scores_from_files(predictions, work / "phantom" / "test_groundtruth")
    assert set(summary["test_metrics"]) == {*measured, "ece"}
    assert {k: summary["test_metrics"][k] for k in measured} == pytest.approx(measured, abs=1e-4)
    ece = summary["test_metrics"]["ece"]
    assert 0.0 <= ece <= 1.0
    assert f"demo bar ece <= 0.1: {ece:.3f} {'met' if ece <= 0.1 else 'NOT met'}" in out
    for name, bar in README_BARS.items():  # each bar printed against the measured number, with its verdict
        score = summary["test_metrics"][name]  # printed from the summary, which equals the recomputed numbers above
        assert f"demo bar {name} >= {bar}: {score:.3f} {verdict(score, bar)}" in out
    lesions = summary["test_lesions"]  # lesion-wise sensitivity by size beside the bars (issue 17)
    metrics = json.loads((predictions / "metrics.json").read_text())["lesions"]
    assert lesions["by_size"] == {b["bin"]: f"{b['detected']}/{b['total']}" for b in metrics["by_size"]}
    assert sum(int(v.split("/")[1]) for v in lesions["by_size"].values()) == metrics["n_true_lesions"] >= 3
    assert "lesion-wise sensitivity by size: " + ", ".join(f"{k} {v}" for k, v in lesions["by_size"].items()) in out
    assert summary["reused"] == []
    assert len(list(predictions.glob("quiz_*.nii.gz"))) == 3
    report = predictions / "report" / "report.html"
    parser = parse_page(report)
    assert_self_contained(report, parser)
    assert "training_curves.png" in decoded_images(parser)  # the model's curves, found through --training-dir
    assert_tables_hold_metrics(parser, json.loads((predictions / "metrics.json").read_text()))
    assert check_submission(work / "demo_submission.zip", work / "phantom" / "test") == []
    assert list((work / "phantom" / "preview").glob("*.png"))

    assert cli_main(["demo", *options]) == 0
    again = json.loads((work / "demo_summary.json").read_text())
    assert again["reused"] == ["phantom data", "import", "plan + preprocess", "train"]
    assert "already done, reused" in capsys.readouterr().out


def test_demo_summary_marks_each_bar_met_or_not_met():
    """A bar reached exactly is met; a score a hair below it is not, however it rounds for printing."""
    metrics = {"segmentation": {"dice_pancreas": {"mean": 0.9}, "dice_lesion": {"mean": 0.5999}},
               "classification": {"accuracy": 0.95, "macro": {"f1": 0.95}}}
    text = format_result(DemoResult(stage_seconds={"train": 2.0}, metrics=metrics))
    assert "demo bar whole_pancreas_dice >= 0.9: 0.900 met" in text
    assert "demo bar lesion_dice >= 0.6: 0.600 NOT met" in text
    assert "demo bar macro_f1 >= 0.8: 0.950 met" in text
    assert len([line for line in text.splitlines() if line.strip().startswith("demo bar")]) == len(README_BARS)
