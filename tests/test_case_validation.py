"""Case-level validation every few epochs: numbers only in the epochs that measured them, NaN/null between."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_DATASET_ID, TINY_PLANS

from nnunet_mtl.training.run import TrainSettings, build_trainer, train

CASE_KEYS = ("val_case_pancreas_dice", "val_case_lesion_dice", "val_cls_accuracy", "val_cls_macro_f1")


@pytest.fixture()
def fold_2_removed_afterwards(tiny_env):
    """Fold 2 lands in the tiny model's folder; predictors that load every fold must not find it afterwards."""
    yield
    shutil.rmtree(build_trainer(TINY_DATASET_ID, TINY_PLANS, 2, "cpu").output_folder, ignore_errors=True)


def test_case_level_numbers_only_in_the_epochs_that_measured_them(tiny_env, fold_2_removed_afterwards,
                                                                   monkeypatch):
    from nnunet_mtl.training.trainer import COMBINED_EMA, nnUNetTrainerMTL
    from nnunet_mtl.training.validation import combined_score

    measured_epochs, best_saved_at = [], []
    original_validation, original_save = nnUNetTrainerMTL.case_level_validation, nnUNetTrainerMTL.save_checkpoint

    def counting_validation(self):
        measured_epochs.append(self.current_epoch)
        return original_validation(self)

    def recording_save(self, filename):
        if filename.endswith("checkpoint_best.pth"):
            best_saved_at.append(self.current_epoch)
        return original_save(self, filename)

    monkeypatch.setattr(nnUNetTrainerMTL, "case_level_validation", counting_validation)
    monkeypatch.setattr(nnUNetTrainerMTL, "save_checkpoint", recording_save)
    torch.manual_seed(0)
    settings = TrainSettings(epochs=4, iterations=1, val_iterations=1, case_validation_every=2)
    folder = Path(train(TINY_DATASET_ID, TINY_PLANS, 2, "cpu", settings, validate=False)["output_folder"])

    assert measured_epochs == [0, 2, 3]  # every second epoch, and the last
    curves = json.loads((folder / "training_curves.json").read_text())  # standard JSON: no NaN tokens
    for key in (*CASE_KEYS, "combined_score", "ema_combined_score"):
        assert len(curves[key]) == 4
        assert curves[key][1] is None and all(curves[key][e] is not None for e in (0, 2, 3)), key
    scores = [combined_score(curves["val_case_pancreas_dice"][e], curves["val_case_lesion_dice"][e],
                             curves["val_cls_macro_f1"][e]) for e in (0, 2, 3)]
    assert [curves["combined_score"][e] for e in (0, 2, 3)] == pytest.approx(scores)
    ema = [scores[0]]  # the EMA runs over measured epochs only
    for score in scores[1:]:
        ema.append(COMBINED_EMA * ema[-1] + (1 - COMBINED_EMA) * score)
    assert [curves["ema_combined_score"][e] for e in (0, 2, 3)] == pytest.approx(ema)
    assert 1 not in best_saved_at and best_saved_at[0] == 0  # an epoch that measured nothing cannot be best
    log = next(folder.glob("training_log_*.txt")).read_text()
    assert log.count("case-level:") == 3
    assert (folder / "progress_classification.png").is_file()
    saved = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert math.isnan(saved["logging"]["val_cls_macro_f1"][1])  # the checkpoint keeps nnU-Net's one value/epoch


def test_curves_with_unmeasured_epochs_become_standard_json_and_plot_the_measured_points(tmp_path):
    from nnunet_mtl.evaluation.report import plot_training_curves
    from nnunet_mtl.training.curves import measured, not_measured_as_null, plot_classification_progress

    nan = float("nan")
    logged = {"val_cls_macro_f1": [0.2, nan, nan, 0.5, nan, 0.7], "train_losses": [1.0, 0.9, 0.8, 0.7, 0.6, 0.5],
              "combined_score": [0.3, nan, nan, 0.6, nan, 0.8], "lrs": [0.01] * 6, "epoch": 6}
    plain = not_measured_as_null(logged)
    assert plain["val_cls_macro_f1"] == [0.2, None, None, 0.5, None, 0.7] and plain["epoch"] == 6
    assert json.loads(json.dumps(plain, allow_nan=False)) == plain
    assert measured(plain["val_cls_macro_f1"], 6) == ([0, 3, 5], [0.2, 0.5, 0.7])
    assert measured(logged["val_cls_macro_f1"], 4) == ([0, 3], [0.2, 0.5])
    figure = plot_training_curves(plain)
    lines = {line.get_label(): line for ax in figure.axes for line in ax.get_lines()}
    assert list(lines["macro-F1"].get_xdata()) == [0, 3, 5] and list(lines["macro-F1"].get_ydata()) == [0.2, 0.5,
                                                                                                        0.7]
    plot_classification_progress(plain, tmp_path / "progress_classification.png")
    assert (tmp_path / "progress_classification.png").stat().st_size > 0
