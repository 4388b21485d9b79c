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
    assert set(summary["test_metrics"]) == {"whole_pancreas_dice", "lesion_dice", "accuracy", "macro_f1"}
    lesions = summary["test_lesions"]  # lesion-wise sensitivity by size beside the bars (issue 17)
    metrics = json.loads((work / "demo_predictions" / "metrics.json").read_text())["lesions"]
    assert lesions["by_size"] == {b["bin"]: f"{b['detected']}/{b['total']}" for b in metrics["by_size"]}
    assert sum(int(v.split("/")[1]) for v in lesions["by_size"].values()) == metrics["n_true_lesions"] >= 3
    assert "lesion-wise sensitivity by size: " + ", ".join(f"{k} {v}" for k, v in lesions["by_size"].items()) in out
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
