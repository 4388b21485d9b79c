"""Training curves beside nnU-Net's progress.png: the loss parts and the case-level numbers per epoch.

Case-level numbers are measured every few epochs only; the epochs between hold NaN ("not measured"), written as
null in ``training_curves.json`` and left out of the plots, which join the measured epochs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def not_measured_as_null(curves: dict[str, list]) -> dict[str, list]:
    """NaN (an epoch that did not measure the value) as None, so the JSON is standard (null, not NaN)."""
    return {k: [None if isinstance(v, float) and math.isnan(v) else v for v in values]
            if isinstance(values, list) else values for k, values in curves.items()}


def measured(values: list, n: int) -> tuple[list[int], list[float]]:
    """Epochs and values of the first ``n`` epochs that hold a measurement (not None, not NaN)."""
    points = [(i, float(v)) for i, v in enumerate(values[:n]) if v is not None and not math.isnan(float(v))]
    return [i for i, _ in points], [v for _, v in points]


def plot_classification_progress(curves: dict[str, list], path: Path) -> None:
    n = len(curves.get("combined_score", []))
    if n == 0:
        return
    # nnU-Net's progress plot sets seaborn's font_scale=2.5 for the whole process just before this one
    with matplotlib.rc_context(matplotlib.rcParamsDefault):
        _plot(curves, n, path)


def _plot(curves: dict[str, list], n: int, path: Path) -> None:
    epochs = list(range(n))
    fig, (ax_loss, ax_metrics) = plt.subplots(2, 1, figsize=(10, 9), sharex=True)
    for key, label, style in [("train_seg_losses", "segmentation loss (train)", "b-"),
                              ("val_seg_losses", "segmentation loss (val patches)", "b--"),
                              ("train_cls_losses", "subtype loss (train)", "r-"),
                              ("val_cls_losses", "subtype loss (val patches)", "r--")]:
        if len(curves.get(key, [])) >= n:
            ax_loss.plot(epochs, curves[key][:n], style, label=label)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss parts (segmentation: Dice + CE with deep supervision; subtype: CE)")
    ax_loss.legend(loc="upper right")
    ax_loss.grid(alpha=0.3)
    for key, label, style in [("val_case_pancreas_dice", "whole-pancreas Dice (cases)", "g-"),
                              ("val_case_lesion_dice", "lesion Dice (cases)", "g--"),
                              ("val_cls_accuracy", "subtype accuracy (cases)", "m--"),
                              ("val_cls_macro_f1", "subtype macro-F1 (cases)", "m-"),
                              ("ema_combined_score", "combined score, EMA (selects best)", "k-")]:
        if len(curves.get(key, [])) >= n:
            x, y = measured(curves[key], n)
            ax_metrics.plot(x, y, style, label=label, marker="o" if len(x) < 60 else None, markersize=3)
    ax_metrics.set_ylim(0, 1.02)
    ax_metrics.set_xlabel("epoch")
    ax_metrics.set_ylabel("score")
    ax_metrics.set_title("Case-level validation (measured epochs)")
    ax_metrics.legend(loc="lower right")
    ax_metrics.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
