"""The demo's code path end to end on a CI-sized phantom (a couple of iterations), then reuse on a second run."""

from __future__ import annotations

import json
from html.parser import HTMLParser

from nnunet_mtl.cli import main as cli_main
from nnunet_mtl.demo import DEMO_BARS
from nnunet_mtl.inference.submission import check_submission


def test_demo_pipeline_runs_end_to_end_and_reuses_finished_stages(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    work = tmp_path / "work"
    args = ["demo", "--workdir", str(work), "--epochs", "1", "--iterations", "2", "--train-per-subtype", "1,1,1",
            "--val-per-subtype", "1,1,1", "--test-cases", "3", "--device", "cpu"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "nnunet-mtl demo summary" in out and "time per stage" in out
    summary = json.loads((work / "demo_summary.json").read_text())
    for name, bar in DEMO_BARS.items():  # each bar printed against the measured number, with its verdict
        score = summary["test_metrics"][name]
        assert f"demo bar {name} >= {bar}: {score:.3f} {'met' if score >= bar else 'NOT met'}" in out
    assert set(summary["test_metrics"]) == {"whole_pancreas_dice", "lesion_dice", "accuracy", "macro_f1", "ece"}
    ece = summary["test_metrics"]["ece"]
    assert f"demo bar ece <= 0.1: {ece:.3f} {'met' if ece <= 0.1 else 'NOT met'}" in out
    assert summary["reused"] == []
    predictions = work / "demo_predictions"
    assert len(list(predictions.glob("quiz_*.nii.gz"))) == 3
    assert (predictions / "metrics.json").is_file()
    report = predictions / "report" / "report.html"
    HTMLParser().feed(report.read_text())
    assert check_submission(work / "demo_submission.zip", work / "phantom" / "test") == []
    assert list((work / "phantom" / "preview").glob("*.png"))

    assert cli_main(args) == 0
    again = json.loads((work / "demo_summary.json").read_text())
    assert again["reused"] == ["phantom data", "import", "plan + preprocess", "train"]
    assert "already done, reused" in capsys.readouterr().out
