"""Training curves beside nnU-Net's progress.png: the loss parts and the case-level numbers per epoch."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
            ax_metrics.plot(epochs, curves[key][:n], style, label=label)
    ax_metrics.set_ylim(0, 1.02)
    ax_metrics.set_xlabel("epoch")
    ax_metrics.set_ylabel("score")
    ax_metrics.set_title("Case-level validation")
    ax_metrics.legend(loc="lower right")
    ax_metrics.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
