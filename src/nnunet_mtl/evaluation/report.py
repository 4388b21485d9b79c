"""Figures and one self-contained HTML page for a run, from ``metrics.json`` (written by evaluate) and
``training_curves.json`` (written by the trainer).

The input is either a prediction folder holding ``metrics.json`` or a training fold folder holding
``training_curves.json`` and ``validation/metrics.json``. Training curves of a prediction folder are looked up in the
folder itself and its parent (a fold's ``validation/`` folder sits inside the fold), unless ``training_dir`` is given.

Figures (PNG, written next to ``report.html``, each only when its data exists):

- ``confusion_matrix.png``: subtype confusion matrix, counts and row-normalised (diagonal = recall);
- ``dice_distribution.png``: per-case whole-pancreas and lesion Dice, and surface Dice, as box plots with every case
  as a point coloured by true subtype, targets dashed;
- ``training_curves.png``: losses (total, segmentation, classification), segmentation Dice (patch pseudo Dice and
  case-level), classification metrics and learning rate per epoch;
- ``reliability_diagram.png``: top-label calibration: accuracy per confidence bin against the diagonal, with ECE;
- ``lesion_sensitivity.png``: lesion-wise sensitivity per true-lesion size bin (detected / total on each bar, 95 %
  Wilson interval), false-positive lesions per case by size and by location (:mod:`~nnunet_mtl.evaluation.lesions`);
- ``froc.png``: the FROC curve, sensitivity against false-positive lesions per case as the lesion-probability
  threshold moves (needs predict's ``lesion_candidates.csv``);
- ``overlay_best.png``, ``overlay_median.png``, ``overlay_worst.png``: the CT slice with the most truth lesion in
  the soft-tissue window (W400/L40), with true (solid) and predicted (dashed) pancreas and lesion contours; cases
  ranked by whole-pancreas Dice + lesion Dice.

The page embeds every figure as a base64 data URI and uses only inline CSS, so it opens anywhere without network.
Figures are drawn on ``matplotlib.figure.Figure`` objects (Agg canvas), never through pyplot's global state.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from nnunet_mtl.evaluation.evaluate import METRICS_JSON, NIFTI, image_path
from nnunet_mtl.evaluation.metrics import METRIC_LABELS, SEGMENTATION_METRICS
from nnunet_mtl.paths import make_dirs

CURVES_JSON = "training_curves.json"
REPORT_HTML = "report.html"
WINDOW_LEVEL_HU, WINDOW_WIDTH_HU = 40.0, 400.0
OVERLAY_MARGIN_VOXELS = 16
DPI = 110
SUBTYPE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
# Panels of the training-curve figure: title, y label, [(key, legend label)].
CURVE_PANELS = (
    ("Total loss", "loss", [("train_losses", "train"), ("val_losses", "validation")]),
    ("Segmentation loss (Dice + CE)", "loss", [("train_seg_losses", "train"), ("val_seg_losses", "validation")]),
    ("Classification loss (CE)", "loss", [("train_cls_losses", "train"), ("val_cls_losses", "validation")]),
    ("Segmentation (validation)", "Dice",
     [("mean_fg_dice", "pseudo Dice (patches)"), ("ema_fg_dice", "pseudo Dice, EMA (patches)"),
      ("val_case_pancreas_dice", "whole-pancreas Dice (cases)"), ("val_case_lesion_dice", "lesion Dice (cases)")]),
    ("Classification (validation)", "score", [("val_cls_accuracy", "accuracy"), ("val_cls_macro_f1", "macro-F1"),
                                              ("combined_score", "combined score"),
                                              ("ema_combined_score", "combined score, EMA")]),
    ("Learning rate", "learning rate", [("lrs", "learning rate")]),
)
CAPTIONS = {
    "confusion_matrix": "Subtype confusion matrix, rows = truth, columns = prediction: counts (left) and "
                        "row-normalised (right; the diagonal is each class's recall).",
    "dice_distribution": "Per-case Dice and normalised surface Dice; boxes show quartiles, points are cases "
                         "coloured by true subtype, dashed lines are the task's targets.",
    "training_curves": "Training curves per epoch. Pseudo Dice is measured on validation patches and is more "
                       "optimistic than case-level numbers.",
    "reliability_diagram": "Reliability diagram: fraction correct per bin of top-class confidence; bars on the "
                           "diagonal mean calibrated probabilities. Bottom: cases per bin.",
    "overlay": "Axial CT slice with the most truth lesion (window W400/L40). Solid = truth, dashed = prediction; "
               "green = whole pancreas, red = lesion.",
    "lesion_sensitivity": "Lesion-wise detection. Left: share of true lesions detected (a predicted component with "
                          "IoU > threshold) per lesion volume, detected / total on each bar, whiskers = 95 % Wilson "
                          "interval. Right: false-positive lesion components per case, by volume and by where they "
                          "sit relative to the true gland.",
    "froc": "FROC: sensitivity against false-positive lesions per case as the lesion-probability threshold on "
            "predicted components moves from high (left) to low (right); dotted lines mark the reported budgets.",
}


class ReportError(ValueError):
    """Nothing to report on, or unreadable inputs; the message says what was looked for."""


@dataclass
class RunInputs:
    """What a report is built from; either part may be missing, not both."""

    run_dir: Path
    metrics: dict | None
    metrics_path: Path | None
    curves: dict | None
    curves_path: Path | None
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"cannot read {path}: {e}") from None


def locate_inputs(run_dir: str | Path, training_dir: str | Path | None = None) -> RunInputs:
    """Find metrics.json and training_curves.json for a prediction folder or a training fold folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a folder")
    metrics_path = next((p for p in (run_dir / METRICS_JSON, run_dir / "validation" / METRICS_JSON) if p.is_file()),
                        None)
    if training_dir is not None:
        curves_path = Path(training_dir) / CURVES_JSON
        if not curves_path.is_file():
            raise ReportError(f"{training_dir} holds no {CURVES_JSON}")
    else:
        curves_path = next((d / CURVES_JSON for d in (run_dir, run_dir.parent) if (d / CURVES_JSON).is_file()), None)
    if metrics_path is None and curves_path is None:
        raise ReportError(f"{run_dir} holds neither {METRICS_JSON} (run `nnunet-mtl evaluate` first), "
                          f"validation/{METRICS_JSON} nor {CURVES_JSON}")
    inputs = RunInputs(run_dir, None if metrics_path is None else _read_json(metrics_path), metrics_path,
                       None if curves_path is None else _read_json(curves_path), curves_path)
    if metrics_path is None:
        inputs.notes.append(f"no {METRICS_JSON} found: case-level metrics are not part of this report")
    if curves_path is None:
        inputs.notes.append(f"no {CURVES_JSON} found (give --training-dir): no training curves")
    return inputs


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_confusion_matrix(confusion: list[list[int]], class_names: list[str], title: str = ""):
    """Counts and row-normalised confusion matrix side by side (rows truth, columns prediction)."""
    counts = np.asarray(confusion, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    k = len(class_names)
    fig = _new_figure(4.0 + 2.4 * k, 1.6 + 1.0 * k)
    for ax, values, panel, fmt in ((fig.add_subplot(1, 2, 1), counts, "Counts", "{:.0f}"),
                                   (fig.add_subplot(1, 2, 2), normalised, "Row-normalised (diagonal = recall)",
                                    "{:.2f}")):
        ax.imshow(values, cmap="Blues", vmin=0, vmax=max(values.max(), 1e-9))
        for i in range(k):
            for j in range(k):
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=11,
                        color="white" if values[i, j] > 0.6 * values.max() else "black")
        ax.set_xticks(range(k), class_names, rotation=20 if max(map(len, class_names)) > 10 else 0)
        ax.set_yticks(range(k), class_names)
        ax.set_xlabel("Predicted subtype")
        ax.set_ylabel("True subtype")
        ax.set_title(panel)
    if title:
        fig.suptitle(title)
    return fig


def plot_dice_distribution(per_case: list[dict], class_names: list[str] | None, tolerance_mm: float,
                           targets: dict[str, float]):
    """Box plots with every case as a point: Dice (whole pancreas, lesion) and NSD at the tolerance."""
    fig = _new_figure(10.0, 4.6)
    rng = np.random.default_rng(0)  # fixed jitter: the same run always gives the same picture
    subtypes = [c.get("subtype_true") for c in per_case]
    panels = (("dice", "Dice", f"Per-case Dice (n={len(per_case)})"),
              ("nsd", "normalised surface Dice", f"Per-case surface Dice at {tolerance_mm:g} mm"))
    for index, (prefix, ylabel, title) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, 2, index)
        keys = [f"{prefix}_pancreas", f"{prefix}_lesion"]
        values = [[c[k] for c in per_case] for k in keys]
        ax.boxplot(values, positions=[1, 2], widths=0.5, showfliers=False, medianprops={"color": "black"})
        for position, series in zip((1, 2), values):
            x = position + rng.uniform(-0.15, 0.15, len(series))
            colours = ["tab:gray" if s is None else SUBTYPE_COLOURS[s % len(SUBTYPE_COLOURS)] for s in subtypes]
            ax.scatter(x, series, c=colours, s=22, alpha=0.8, edgecolors="white", linewidths=0.5, zorder=3)
        for position, key in zip((1, 2), keys):
            if key in targets:
                ax.hlines(targets[key], position - 0.3, position + 0.3, colors="tab:red", linestyles="--",
                          label="_nolegend_" if ax.get_legend_handles_labels()[0] else "task target")
                ax.annotate(f"{targets[key]:g}", (position + 0.31, targets[key]), color="tab:red", fontsize=8,
                            va="center")
        ax.set_xticks([1, 2], ["whole pancreas\n(label > 0)", "lesion\n(label 2)"])
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("structure")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        if index == 1 and class_names and any(s is not None for s in subtypes):
            from matplotlib.lines import Line2D

            handles = [Line2D([], [], marker="o", linestyle="", color=SUBTYPE_COLOURS[k % len(SUBTYPE_COLOURS)],
                              label=f"true {name}") for k, name in enumerate(class_names)]
            handles += ax.get_legend_handles_labels()[0]
            ax.legend(handles=handles, loc="lower left", fontsize=8, framealpha=0.9)
    return fig


def _curve(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def plot_training_curves(curves: dict, macro_f1_target: float | None = None):
    """One panel per group of logged curves; groups without any logged value are left out. None if nothing."""
    panels = [(title, ylabel, [(k, label) for k, label in series if curves.get(k)])
              for title, ylabel, series in CURVE_PANELS]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(4.6 * ncols, 3.4 * nrows)
    for index, (title, ylabel, series) in enumerate(panels, start=1):
        ax = fig.add_subplot(nrows, ncols, index)
        for key, label in series:
            y = _curve(curves[key])
            x = np.flatnonzero(~np.isnan(y))  # case-level numbers exist only in the epochs that measured them
            ax.plot(x, y[x], label=label, linewidth=1.2, marker="o" if len(x) < 30 else None, markersize=3)
        if any(key == "lrs" for key, _ in series):
            ax.set_yscale("log")
        if title.startswith("Classification (") and macro_f1_target is not None:
            ax.axhline(macro_f1_target, color="black", linestyle=":", linewidth=1.2,
                       label=f"macro-F1 target {macro_f1_target:g}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def plot_reliability(calibration: dict):
    """Reliability diagram (accuracy vs confidence per bin, diagonal = perfect) over a histogram of cases per bin."""
    bins = calibration["bins"]
    width = 1.0 / calibration["n_bins"]
    centres = np.array([(b["lower"] + b["upper"]) / 2 for b in bins])
    filled = np.array([b["count"] > 0 for b in bins])
    accuracy = np.array([b["accuracy"] if b["count"] else 0.0 for b in bins])
    confidence = np.array([b["confidence"] if b["count"] else np.nan for b in bins])
    fig = _new_figure(5.6, 6.0)
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.bar(centres[filled], accuracy[filled], width=width * 0.95, color="tab:blue", alpha=0.8, edgecolor="black",
            label="fraction correct")
    top.plot(centres[filled], confidence[filled], "o", color="tab:orange", label="mean confidence")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_xlabel("confidence (largest predicted probability)")
    top.set_ylabel("accuracy (fraction correct)")
    top.set_title(f"Reliability diagram: ECE {calibration['ece']:.3f} ({calibration['n_bins']} bins)")
    top.legend(loc="upper left", fontsize=8)
    top.tick_params(labelbottom=True)
    bottom.bar(centres, [b["count"] for b in bins], width=width * 0.95, color="tab:gray", edgecolor="black")
    bottom.set_xlabel("confidence (largest predicted probability)")
    bottom.set_ylabel("cases")
    bottom.set_title("Cases per confidence bin")
    return fig


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion: honest for the small counts of a size bin."""
    if total == 0:
        return (float("nan"), float("nan"))
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def plot_lesion_sensitivity(lesions: dict):
    """Sensitivity per size bin (with counts and Wilson intervals) beside false positives per case."""
    fig = _new_figure(11.0, 4.4)
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    bins = lesions["by_size"]
    x = np.arange(len(bins))
    values = [b["sensitivity"] if b["sensitivity"] is not None else 0.0 for b in bins]
    intervals = [wilson_interval(b["detected"], b["total"]) for b in bins]
    errors = np.array([[v - lo if b["total"] else 0, hi - v if b["total"] else 0]
                       for v, (lo, hi), b in zip(values, intervals, bins)]).T
    left.bar(x, values, color="tab:blue", alpha=0.85, edgecolor="black", yerr=errors, capsize=4)
    for i, b in enumerate(bins):
        left.annotate(f"{b['detected']}/{b['total']}", (i, 0.02), ha="center", color="white" if values[i] > 0.1
                      else "black", fontsize=9)
    left.set_xticks(x, [b["bin"] for b in bins])
    left.set_ylim(0, 1.05)
    left.set_xlabel("true lesion volume")
    left.set_ylabel("sensitivity (detected / total)")
    large = lesions["sensitivity_min_volume"]
    title = f"Lesion-wise sensitivity (IoU > {lesions['rule']['iou_threshold']:g})"
    if large["sensitivity"] is not None:
        title += f"; >= {large['min_volume_ml']:g} ml: {large['detected']}/{large['total']}"
    left.set_title(title)
    left.grid(axis="y", alpha=0.3)
    fp = lesions["false_positives"]
    n_cases = lesions["n_cases"]
    labels = [b["bin"] for b in fp["by_size"]]
    locations = list(fp["by_location"])
    right.bar(np.arange(len(labels)), [b["count"] / n_cases for b in fp["by_size"]], color="tab:red", alpha=0.8,
              edgecolor="black", label="by volume")
    right.bar(len(labels) + 0.5 + np.arange(len(locations)), [fp["by_location"][k] / n_cases for k in locations],
              color="tab:orange", alpha=0.8, edgecolor="black", label="by location (true gland)")
    right.set_xticks(list(np.arange(len(labels))) + list(len(labels) + 0.5 + np.arange(len(locations))),
                     labels + locations, rotation=30, ha="right")
    right.set_xlabel("false lesion volume | location relative to the true gland")
    right.set_ylabel("false-positive lesions per case")
    right.set_title(f"False-positive lesions: {fp['per_case']:.2f} per case ({fp['total']} in {n_cases} cases)")
    right.legend(fontsize=8)
    right.grid(axis="y", alpha=0.3)
    return fig


def plot_froc(lesions: dict):
    """FROC curve (sensitivity against false positives per case); None without predict's lesion scores."""
    curve = lesions.get("froc")
    if curve is None or curve["sensitivity"][0] is None:
        return None
    fig = _new_figure(6.0, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.step(curve["fp_per_case"], curve["sensitivity"], where="post", color="tab:blue", linewidth=1.6)
    ax.plot(curve["fp_per_case"], curve["sensitivity"], "o", color="tab:blue", markersize=3)
    for point in lesions.get("sensitivity_at_fp") or []:
        ax.axvline(point["fp_budget"], color="gray", linestyle=":", linewidth=1)
        ax.annotate(f"{point['sensitivity']:.2f}", (point["fp_budget"], point["sensitivity"]), fontsize=8,
                    xytext=(3, -12), textcoords="offset points")
    ax.set_xlabel("false-positive lesions per case")
    ax.set_ylabel(f"sensitivity (true lesions >= {curve['min_volume_ml']:g} ml, n={curve['n_true_lesions']})")
    ax.set_ylim(0, 1.03)
    ax.set_xlim(left=0)
    ax.set_title("FROC (threshold on the largest lesion probability per component)")
    ax.grid(alpha=0.3)
    return fig


def lesion_slice(truth: np.ndarray) -> int:
    """Axial index with the most truth lesion; the most pancreas when there is no lesion; the middle if empty."""
    for mask in (truth == 2, truth > 0):
        per_slice = mask.sum(axis=(1, 2))
        if per_slice.any():
            return int(per_slice.argmax())
    return truth.shape[0] // 2


def select_overlay_cases(per_case: list[dict]) -> dict[str, list[str]]:
    """Best, median and worst case by whole-pancreas + lesion Dice, as {case: [roles]} (one case may hold several)."""
    ranked = sorted(per_case, key=lambda c: (c["dice_pancreas"] + c["dice_lesion"], c["case"]))
    chosen: dict[str, list[str]] = {}
    for role, row in (("best", ranked[-1]), ("median", ranked[(len(ranked) - 1) // 2]), ("worst", ranked[0])):
        chosen.setdefault(row["case"], []).append(role)
    return chosen


def plot_overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, spacing_zyx: tuple[float, float, float],
                 title: str):
    """CT slice (W400/L40) beside the same slice with truth (solid) and prediction (dashed) contours."""
    from matplotlib.lines import Line2D

    z = lesion_slice(truth)
    union = (truth > 0) | (pred > 0)
    if union.any():
        rows, cols = np.where(union.any(axis=0))
        y0, y1 = max(rows.min() - OVERLAY_MARGIN_VOXELS, 0), min(rows.max() + OVERLAY_MARGIN_VOXELS + 1, truth.shape[1])
        x0, x1 = max(cols.min() - OVERLAY_MARGIN_VOXELS, 0), min(cols.max() + OVERLAY_MARGIN_VOXELS + 1, truth.shape[2])
    else:
        y0, y1, x0, x1 = 0, truth.shape[1], 0, truth.shape[2]
    crop = (z, slice(y0, y1), slice(x0, x1))
    ct, t, p = image[crop], truth[crop], pred[crop]
    aspect = spacing_zyx[1] / spacing_zyx[2]
    extent = (x0 - 0.5, x1 - 0.5, y1 - 0.5, y0 - 0.5)
    low, high = WINDOW_LEVEL_HU - WINDOW_WIDTH_HU / 2, WINDOW_LEVEL_HU + WINDOW_WIDTH_HU / 2
    panel_height = float(np.clip(4.6 * (y1 - y0) * spacing_zyx[1] / ((x1 - x0) * spacing_zyx[2]), 2.5, 7.0))
    fig = _new_figure(10.0, panel_height + 1.9)
    axes = fig.subplots(1, 2)
    for ax, panel in zip(axes, ("CT, soft-tissue window W400/L40", "truth (solid) vs prediction (dashed)")):
        ax.imshow(ct, cmap="gray", vmin=low, vmax=high, aspect=aspect, extent=extent, interpolation="nearest")
        ax.set_xlabel(f"x (voxel, {spacing_zyx[2]:.2f} mm)")
        ax.set_ylabel(f"y (voxel, {spacing_zyx[1]:.2f} mm)")
        ax.set_title(f"{panel}\naxial slice z = {z} of {truth.shape[0]}")
    ys, xs = np.arange(y0, y1), np.arange(x0, x1)
    for mask, colour in ((lambda a: a > 0, "lime"), (lambda a: a == 2, "red")):
        for labels, style in ((t, "solid"), (p, "dashed")):
            selected = mask(labels)
            if selected.any() and not selected.all():
                axes[1].contour(xs, ys, selected.astype(float), levels=[0.5], colors=colour, linestyles=style,
                                linewidths=1.6)
    handles = [Line2D([], [], color="lime", label="pancreas, truth"),
               Line2D([], [], color="lime", linestyle="--", label="pancreas, prediction"),
               Line2D([], [], color="red", label="lesion, truth"),
               Line2D([], [], color="red", linestyle="--", label="lesion, prediction")]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8)
    fig.suptitle(title)
    return fig


def _class_name(names: list[str] | None, label: int) -> str:
    return names[label] if names and 0 <= label < len(names) else str(label)


def _overlay_figures(metrics: dict, notes: list[str]) -> list[tuple[str, object, str]]:
    """(file stem, figure, caption) for the best, median and worst cases; notes say why overlays are missing."""
    from nnunet_mtl.data.nifti import NiftiError, read_volume
    from nnunet_mtl.evaluation.evaluate import EvaluationError, read_label_map

    sources = metrics.get("sources", {})
    if not metrics.get("per_case"):
        return []
    if not sources.get("images"):
        notes.append("no images recorded by evaluate (use --images): CT overlays skipped")
        return []
    names = (metrics.get("classification") or {}).get("class_names")
    figures = []
    for case, roles in select_overlay_cases(metrics["per_case"]).items():
        files = (image_path(Path(sources["images"]), case), Path(sources["truth_masks"]) / f"{case}{NIFTI}",
                 Path(sources["pred"]) / f"{case}{NIFTI}")
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            notes.append(f"overlay of {case} skipped: {', '.join(absent)} not found")
            continue
        try:  # every file through the verified reader: a damaged one stops the report, named
            image = read_volume(files[0], "image").array
            truth, spacing = read_label_map(files[1])
            pred, _ = read_label_map(files[2])
        except (NiftiError, EvaluationError) as e:
            raise ReportError(f"overlay of {case}: {e}") from None
        row = next(r for r in metrics["per_case"] if r["case"] == case)
        title = (f"{' / '.join(roles).capitalize()} case {case}: whole-pancreas Dice {row['dice_pancreas']:.3f}, "
                 f"lesion Dice {row['dice_lesion']:.3f}")
        if row.get("subtype_true") is not None:
            title += (f"\ntrue subtype: {_class_name(names, row['subtype_true'])}, "
                      f"predicted: {_class_name(names, row['subtype_pred'])}")
        figures.append((f"overlay_{roles[0]}", plot_overlay(image, truth, pred, spacing, title),
                        f"{' / '.join(roles).capitalize()} case ({case}). {CAPTIONS['overlay']}"))
    return figures


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>\n" for row in rows)
    css_class = f' class="{css}"' if css else ""
    return f"<table{css_class}><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def _metrics_sections(metrics: dict) -> str:
    parts = []
    if metrics.get("targets"):
        rows = [[t["label"], t["threshold"], t["value"], t["met"]] for t in metrics["targets"]]
        parts.append("<h2>Task targets</h2>" + _table(["target", "threshold", "value", "met"], rows))
    parts.append(f"<h2>Segmentation ({metrics['n_cases']} cases, surface tolerance {metrics['tolerance_mm']:g} mm)"
                 "</h2>")
    rows = [[METRIC_LABELS.get(k, k), s["mean"], s["median"], s["std"], s["min"], s["max"]]
            for k, s in metrics["segmentation"].items()]
    parts.append(_table(["metric", "mean", "median", "std", "min", "max"], rows))
    cls = metrics.get("classification")
    if cls is not None:
        auc = cls.get("auc_ovr")
        rows = [["accuracy", cls["accuracy"]], ["balanced accuracy", cls["balanced_accuracy"]],
                ["macro precision", cls["macro"]["precision"]], ["macro recall", cls["macro"]["recall"]],
                ["macro F1", cls["macro"]["f1"]], ["weighted precision", cls["weighted"]["precision"]],
                ["weighted recall", cls["weighted"]["recall"]], ["weighted F1", cls["weighted"]["f1"]]]
        if auc is not None:
            rows += [["macro one-vs-rest AUC", auc["macro"]],
                     ["expected calibration error", cls["calibration"]["ece"]]]
        parts.append(f"<h2>Subtype classification ({cls['n_cases']} cases)</h2>" + _table(["metric", "value"], rows))
        per_class = [[c["name"], c["precision"], c["recall"], c["f1"], c["support"]]
                     + ([auc["per_class"][c["label"]]] if auc is not None else []) for c in cls["per_class"]]
        parts.append(_table(["class", "precision", "recall", "F1", "support"]
                            + (["AUC (one-vs-rest)"] if auc is not None else []), per_class))
        matrix = [[f"truth: {name}", *row] for name, row in zip(cls["class_names"], cls["confusion_matrix"])]
        parts.append("<h3>Confusion matrix (rows truth, columns prediction)</h3>"
                     + _table([""] + [f"predicted: {n}" for n in cls["class_names"]], matrix))
    lesions = metrics.get("lesions")
    if lesions:
        large, fp = lesions["sensitivity_min_volume"], lesions["false_positives"]
        rows = [["true lesions detected", f"{lesions['n_detected']} / {lesions['n_true_lesions']}"],
                [f"sensitivity, lesions >= {large['min_volume_ml']:g} ml", large["sensitivity"]],
                ["false-positive lesions per case", fp["per_case"]],
                ["false positives inside / at the border of / outside the true gland",
                 " / ".join(str(v) for v in fp["by_location"].values())],
                ["lesion-wise Dice of detected lesions (mean)", lesions["lesion_dice_detected"]["mean"]],
                ["lesion-presence AUC", lesions["presence_auc"]]]
        rows += [[f"sensitivity at <= {p['fp_budget']:g} false positives per case", p["sensitivity"]]
                 for p in lesions.get("sensitivity_at_fp") or [] if p is not None]
        parts.append(f"<h2>Lesion-wise detection ({html.escape(lesions['rule']['description'])})</h2>"
                     + _table(["lesion-wise metric", "value"], rows))
        parts.append(_table(["true lesion volume", "detected", "total", "sensitivity", "mean Dice of detected"],
                            [[b["bin"], b["detected"], b["total"], b["sensitivity"], b["mean_dice_detected"]]
                             for b in lesions["by_size"]]))
    return "\n".join(parts)


def _per_case_section(metrics: dict) -> str:
    per_case = metrics.get("per_case") or []
    if not per_case:
        return ""
    with_subtypes = per_case[0].get("subtype_true") is not None
    names = (metrics.get("classification") or {}).get("class_names")
    header = ["case", *(METRIC_LABELS[m] for m in SEGMENTATION_METRICS), "truth lesion (ml)", "pred lesion (ml)"]
    header += ["subtype truth", "subtype predicted", "correct"] if with_subtypes else []
    rows = []
    for c in per_case:
        row = [c["case"], *(c[m] for m in SEGMENTATION_METRICS), c.get("truth_lesion_ml"), c.get("pred_lesion_ml")]
        if with_subtypes:
            row += [_class_name(names, c["subtype_true"]), _class_name(names, c["subtype_pred"]), c["correct"]]
        rows.append(row)
    return f"<h2>Per-case metrics</h2>{_table(header, rows, 'per-case')}"


STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f3f7; }
td:first-child, th:first-child { text-align: left; }
table.per-case td, table.per-case th { font-size: 0.85em; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
.small { font-size: 0.85em; color: #555; }
"""


def render_html(inputs: RunInputs, figures: list[tuple[str, Path, str]]) -> str:
    """The whole page as one string: tables, embedded figures (data URIs), conventions and sources."""
    metrics = inputs.metrics
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>nnunet-mtl report: {html.escape(inputs.run_dir.name)}</title>",
             f"<style>{STYLE}</style>", "</head>", "<body>",
             f"<h1>nnunet-mtl report: {html.escape(inputs.run_dir.name)}</h1>",
             f'<p class="small">Run folder {html.escape(str(inputs.run_dir.resolve()))}; generated '
             f"{datetime.now().isoformat(timespec='seconds')}. Tables hold case-level numbers.</p>"]
    if metrics is not None:
        parts.append(_metrics_sections(metrics))
    if figures:
        parts.append("<h2>Figures</h2>")
    for stem, path, caption in figures:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f'<figure id="{stem}"><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}" '
                     f'data-file="{html.escape(path.name)}"><figcaption>{html.escape(caption)}</figcaption></figure>')
    if metrics is not None:
        parts.append(_per_case_section(metrics))
        conventions = [[k, v] for k, v in metrics.get("conventions", {}).items()]
        if conventions:
            parts.append("<h2>Conventions</h2>" + _table(["item", "convention"], conventions))
        sources = [[k, v] for k, v in metrics.get("sources", {}).items()]
        parts.append("<h2>Sources</h2>" + _table(["input", "path"], sources))
    notes = inputs.notes + (metrics.get("notes", []) if metrics else [])
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def build_report(run_dir: str | Path, training_dir: str | Path | None = None,
                 out_dir: str | Path | None = None) -> Path:
    """Write every figure the inputs allow and ``report.html`` into ``out_dir`` (default RUN/report); return it.

    Matplotlib's defaults are restored for the figures: nnU-Net's progress plot sets seaborn's font_scale=2.5
    process-wide, which made these figures unreadable when the report followed training in one process.
    """
    import matplotlib

    with matplotlib.rc_context(matplotlib.rcParamsDefault):
        return _build_report(run_dir, training_dir, out_dir)


def _build_report(run_dir: str | Path, training_dir: str | Path | None, out_dir: str | Path | None) -> Path:
    inputs = locate_inputs(run_dir, training_dir)
    out = Path(out_dir) if out_dir is not None else inputs.run_dir / "report"
    metrics = inputs.metrics
    targets = {t["metric"]: t["threshold"] for t in (metrics or {}).get("targets", [])}
    # the overlays first: they read files, and one that cannot be read stops the report before any figure is drawn
    overlays = _overlay_figures(metrics, inputs.notes) if metrics is not None else []
    pending: list[tuple[str, object, str]] = []
    if metrics is not None:
        cls = metrics.get("classification")
        if cls is not None:
            title = (f"Subtype confusion matrix (n={cls['n_cases']}): accuracy {cls['accuracy']:.3f}, "
                     f"macro-F1 {cls['macro']['f1']:.3f}")
            pending.append(("confusion_matrix", plot_confusion_matrix(cls["confusion_matrix"], cls["class_names"],
                                                                      title), CAPTIONS["confusion_matrix"]))
        if metrics.get("per_case"):
            pending.append(("dice_distribution",
                            plot_dice_distribution(metrics["per_case"], cls["class_names"] if cls else None,
                                                   metrics["tolerance_mm"], targets), CAPTIONS["dice_distribution"]))
    if inputs.curves is not None:
        figure = plot_training_curves(inputs.curves, targets.get("macro_f1"))
        if figure is None:
            inputs.notes.append(f"{inputs.curves_path} holds no known curve")
        else:
            pending.append(("training_curves", figure, CAPTIONS["training_curves"]))
    if metrics is not None:
        calibration = (metrics.get("classification") or {}).get("calibration")
        if calibration is not None:
            pending.append(("reliability_diagram", plot_reliability(calibration), CAPTIONS["reliability_diagram"]))
        lesions = metrics.get("lesions")
        if lesions and lesions["n_true_lesions"] + lesions["n_predicted"] > 0:
            pending.append(("lesion_sensitivity", plot_lesion_sensitivity(lesions), CAPTIONS["lesion_sensitivity"]))
            figure = plot_froc(lesions)
            if figure is None:
                inputs.notes.append("no lesion scores (predict's lesion_candidates.csv): no FROC curve")
            else:
                pending.append(("froc", figure, CAPTIONS["froc"]))
    pending.extend(overlays)
    make_dirs(out)  # only now: inputs that cannot be read leave no folder behind
    written = []
    for stem, figure, caption in pending:
        path = out / f"{stem}.png"
        figure.savefig(path, dpi=DPI)
        written.append((stem, path, caption))
    page = out / REPORT_HTML
    page.write_text(render_html(inputs, written), encoding="utf-8")
    return page
