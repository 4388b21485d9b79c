"""The report: a valid, self-contained HTML page that embeds every figure written, and readable figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from html_checks import (
    assert_embeds_every_figure,
    assert_self_contained,
    assert_tables_hold_metrics,
    chromium_screenshot,
    coloured_fraction,
    parse_page,
)
from volumes import label_map, make_synthetic_set

from nnunet_mtl.cli import main
from nnunet_mtl.evaluation.evaluate import evaluate_folder
from nnunet_mtl.evaluation.metrics import classification_metrics
from nnunet_mtl.evaluation.report import (
    ReportError,
    build_report,
    lesion_slice,
    plot_confusion_matrix,
    plot_dice_distribution,
    plot_froc,
    plot_lesion_sensitivity,
    plot_overlay,
    plot_reliability,
    plot_training_curves,
    select_overlay_cases,
    wilson_interval,
)

ALL_FIGURES = {"confusion_matrix.png", "dice_distribution.png", "training_curves.png", "reliability_diagram.png",
               "overlay_best.png", "overlay_median.png", "overlay_worst.png", "lesion_sensitivity.png", "froc.png"}
CURVES = {"train_losses": [-0.1, -0.3, -0.5], "val_losses": [-0.05, -0.2, -0.4], "train_cls_losses": [1.1, 0.9, 0.7],
          "mean_fg_dice": [0.5, 0.7, 0.8], "ema_fg_dice": [0.5, 0.6, 0.7], "val_case_lesion_dice": [0.1, 0.3, 0.4],
          "val_cls_macro_f1": [0.3, None, 0.6], "lrs": [0.01, 0.0067, 0.0034], "epoch_end_timestamps": [1.0, 2.0, 3.0],
          "dice_per_class_or_region": [[0.5, 0.4], [0.7, 0.5], [0.8, 0.6]]}


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory) -> dict[str, Path]:
    """A fold folder with training curves and an evaluated validation/ prediction folder."""
    root = tmp_path_factory.mktemp("run")
    folders = make_synthetic_set(root, n_cases=6)
    fold = root / "fold_0"
    fold.mkdir()
    folders["pred"] = folders["pred"].rename(fold / "validation")
    (fold / "training_curves.json").write_text(json.dumps(CURVES))
    evaluate_folder(folders["pred"], folders["truth"], images_dir=folders["images"])
    return {**folders, "fold": fold}


@pytest.fixture(scope="module")
def report_page(evaluated_run, tmp_path_factory) -> Path:
    """The report of the evaluated prediction folder, built once for the checks below."""
    out = tmp_path_factory.mktemp("report")
    page = build_report(evaluated_run["pred"], out_dir=out)
    assert page == out / "report.html"
    return page


def test_report_from_prediction_folder_is_valid_self_contained_html(evaluated_run, report_page):
    page = report_page
    parser = parse_page(page)
    assert_self_contained(page, parser)
    # training curves are found in the fold folder above validation/
    assert assert_embeds_every_figure(page.parent, parser) == ALL_FIGURES
    assert_tables_hold_metrics(parser, json.loads((evaluated_run["pred"] / "metrics.json").read_text()))
    assert "Confusion matrix (rows truth, columns prediction)" in page.read_text(encoding="utf-8")


def test_a_browser_renders_the_report_with_its_figures(report_page, tmp_path):
    """Headless Chromium renders the page at the asked size; the figures' colours are on screen (tables and text
    alone, or broken images, are grey)."""
    pixels = chromium_screenshot(report_page, tmp_path, size=(1200, 4000))
    assert pixels.shape[:2] == (4000, 1200)
    assert (pixels[..., :3] < 0.9).any(axis=-1).mean() > 0.05  # not a blank page
    assert coloured_fraction(pixels) > 0.01


def test_report_of_training_fold_via_cli(evaluated_run, capsys):
    assert main(["report", str(evaluated_run["fold"])]) == 0
    page = evaluated_run["fold"] / "report" / "report.html"
    assert str(page) in capsys.readouterr().out
    parser = parse_page(page)
    assert_self_contained(page, parser)
    assert assert_embeds_every_figure(page.parent, parser) == ALL_FIGURES


def test_report_without_images_or_probabilities_or_curves(tmp_path):
    folders = make_synthetic_set(tmp_path, n_cases=3, probabilities=False)
    evaluate_folder(folders["pred"], folders["truth"])
    page = build_report(folders["pred"])
    assert page == folders["pred"] / "report" / "report.html"
    parser = parse_page(page)
    assert assert_embeds_every_figure(page.parent, parser) == {"confusion_matrix.png", "dice_distribution.png",
                                                               "lesion_sensitivity.png"}
    assert_tables_hold_metrics(parser, json.loads((folders["pred"] / "metrics.json").read_text()))
    text = page.read_text(encoding="utf-8")
    assert "CT overlays skipped" in text and "no training curves" in text and "no FROC curve" in text


def test_report_of_curves_only_and_of_nothing(tmp_path, capsys):
    curves, empty = tmp_path / "curves", tmp_path / "empty"
    curves.mkdir()
    empty.mkdir()
    (curves / "training_curves.json").write_text(json.dumps(CURVES))
    page = build_report(curves)
    assert assert_embeds_every_figure(page.parent, parse_page(page)) == {"training_curves.png"}
    with pytest.raises(ReportError, match="neither metrics.json"):
        build_report(empty)
    assert main(["report", str(empty)]) == 2
    assert "nnunet-mtl evaluate" in capsys.readouterr().err
    with pytest.raises(ReportError, match="holds no training_curves.json"):
        build_report(curves, training_dir=empty)


def assert_readable(figure) -> None:
    """Every panel says what it shows: a title and both axis labels."""
    assert figure.axes
    for ax in figure.axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), ax


def test_figures_have_titles_axis_labels_and_class_names():
    names = ["solid", "cystic", "enhancing"]
    confusion = plot_confusion_matrix([[6, 2, 1], [0, 14, 1], [1, 4, 7]], names)
    assert_readable(confusion)
    for ax in confusion.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == names
        assert [t.get_text() for t in ax.get_yticklabels()] == names
    per_case = [{"case": f"c{i}", "dice_pancreas": 0.9, "dice_lesion": 0.1 * i, "nsd_pancreas": 0.95,
                 "nsd_lesion": 0.5, "subtype_true": i % 3} for i in range(6)]
    assert_readable(plot_dice_distribution(per_case, names, 2.0, {"dice_pancreas": 0.91}))
    assert_readable(plot_training_curves(CURVES, 0.7))
    assert plot_training_curves({"unknown": [1, 2]}) is None
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet([1, 1, 1], 30)
    calibration = classification_metrics(rng.integers(0, 3, 30), probabilities.argmax(1), probabilities,
                                         names)["calibration"]
    assert_readable(plot_reliability(calibration))
    truth = label_map((12, 40, 50), (6, 20, 25), (4, 12, 18), (6, 20, 32), (3, 5, 6))
    image = np.where(truth > 0, 60, -90).astype(np.int16)
    assert_readable(plot_overlay(image, truth, np.roll(truth, 2, axis=2), (2.0, 0.7, 0.7), "case"))
    lesions = _lesion_summary()
    figure = plot_lesion_sensitivity(lesions)
    assert_readable(figure)
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["< 0.2 ml", "0.2-1 ml", "1-5 ml", ">= 5 ml"]
    assert_readable(plot_froc(lesions))
    assert plot_froc({**lesions, "froc": None}) is None


def _lesion_summary() -> dict:
    from nnunet_mtl.evaluation.lesions import match_case, summarise

    truth = np.zeros((6, 30, 30), np.uint8)
    truth[1:5, 2:28, 2:28] = 1
    truth[2:4, 5:10, 5:10] = 2
    pred = truth.copy()
    pred[2:4, 5:9, 5:10] = 2
    pred[2, 20, 20] = 2
    cases = [match_case(pred, truth, (2.0, 1.0, 1.0), "a", [((2, 5, 5), 0.9), ((2, 20, 20), 0.6)])]
    return summarise(cases)


def test_wilson_interval_matches_scipy():
    from scipy.stats import binomtest

    for k, n in ((8, 10), (0, 5), (5, 5), (17, 40)):
        expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((expected.low, expected.high), abs=1e-3)


def test_overlay_case_and_slice_selection():
    rows = [{"case": c, "dice_pancreas": p, "dice_lesion": q}
            for c, p, q in (("a", 0.9, 0.1), ("b", 0.95, 0.8), ("c", 0.92, 0.5), ("d", 0.5, 0.0), ("e", 0.9, 0.6))]
    assert select_overlay_cases(rows) == {"b": ["best"], "c": ["median"], "d": ["worst"]}
    assert select_overlay_cases(rows[:1]) == {"a": ["best", "median", "worst"]}
    truth = np.zeros((10, 8, 8), np.uint8)
    truth[2:8, 2:6, 2:6] = 1
    assert lesion_slice(truth) == 2  # no lesion: the slice with the most pancreas (first of equals)
    truth[6, 3:5, 3:5], truth[4, 3, 3] = 2, 2
    assert lesion_slice(truth) == 6
    assert lesion_slice(np.zeros((10, 8, 8), np.uint8)) == 5
