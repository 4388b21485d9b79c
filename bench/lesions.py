"""Lesion-wise detection on a phantom test set: sensitivity by size, false lesions per case, lesion Dice, and what
each false-lesion filter and test-time lever does, with 95 % bootstrap intervals over cases.

Takes any phantom folder (``<phantom>/test/*_0000.nii.gz`` + ``<phantom>/test_groundtruth/*.nii.gz``, e.g. from
``nnunet-mtl phantom --test-cases 180``, or another site's phantom) and a trained model folder. Every case is
predicted once per prediction variant in fast mode, the variants alternating case by case (timings side by side);
masks and lesion probabilities are cached (``--cache``), so later runs only re-score.

Prediction variants (``--variants``):
  fast           the product's fast mode (no mirroring); the largest-component step as the model decided
  lesion_mirror  fast mode plus test-time mirroring of the lesion channel only: the lesion logit is averaged over
                 the 8 flips of the crop (all three axes), the other channels come from the plain pass

Postprocessing settings scored on each variant (no prediction needed):
  raw            no postprocessing at all
  today          the model's largest-component decision, no lesion filters (main before issue 17)
  + each filter alone (minimum lesion volume, minimum lesion probability, lesions outside the gland), a few
  volume-and-probability pairs, and the combination the model's validation chose (postprocessing.json:
  ``lesion_filters``)
  + a lower lesion threshold (``--lesion-thresholds``): gland voxels whose lesion probability reaches it become
  lesion before the rest of the postprocessing, alone and with each stricter minimum lesion probability

Printed per setting: lesion-wise sensitivity by true-lesion size, sensitivity for lesions >= 0.1 ml, false-positive
lesions per case, case-mean lesion Dice (the task's), mean Dice of detected lesions, each with a 95 % percentile
bootstrap interval over cases, and the paired difference against ``today``. Also: where the false lesions sit
(inside / border / outside the true gland) and how large they are, the FROC operating points (thresholds chosen
on this test set: optimistic, for orientation only), and why true lesions are missed, by size (a predicted lesion
touches them with IoU <= 0.1, or none does; the peak lesion probability inside them).

  python bench/lesions.py --model MODEL --phantom work/test150 --cache work/bench_cache

``--overhead N``: instead, the price of the lesion scores in predict on N cases: nnU-Net's export without
probabilities (main before issue 17) against the export with probabilities plus scoring the lesion components,
alternating, on the same logits; printed beside the time of the whole fast-mode case.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VARIANTS = ("fast", "lesion_mirror")
VOLUME_STEPS_ML = (0.005, 0.01, 0.02, 0.05, 0.1)
PROBABILITY_STEPS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
COMBINED_STEPS = ((0.05, 0.9), (0.1, 0.9), (0.1, 0.95))  # (minimum ml, minimum probability) together
MIN_VOLUME_ML = 0.1


@dataclass
class CaseData:
    case: str
    truth: np.ndarray
    raw: np.ndarray  # mask without any postprocessing
    lesion_probability: np.ndarray  # float16 is enough for scores
    spacing: tuple[float, float, float]
    seconds: float


def _mirror_lesion_channel(predictor):
    """Patch one predictor: the lesion logit averaged over all flips of the input, other channels unflipped."""
    import torch

    plain = predictor._internal_maybe_mirror_and_predict

    def lesion_mirrored(x):
        segmentation = plain(x)
        if segmentation.shape[1] <= 2:
            return segmentation
        lesion = segmentation[:, 2].clone()
        axes = [2, 3, 4]
        flips = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
        for combination in flips:
            flipped, _ = predictor._forward(torch.flip(x, combination))
            lesion += torch.flip(flipped, combination)[:, 2]
        segmentation[:, 2] = lesion / (len(flips) + 1)
        return segmentation

    predictor._internal_maybe_mirror_and_predict = lesion_mirrored


def predict_cases(model: Path, phantom: Path, variants: list[str], cache: Path, max_cases: int | None) -> dict:
    """{variant: [CaseData]}; cases are read from the cache when there, else predicted (variants alternating)."""
    import SimpleITK as sitk
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    from nnunet_mtl.inference.predict import PredictionMode, list_cases, load_predictor

    torch.set_num_threads(int(os.environ.get("nnUNet_def_n_proc", "2")))
    cases = list_cases(phantom / "test")
    names = sorted(cases)[:max_cases] if max_cases else sorted(cases)
    predictors = {}
    results: dict[str, list[CaseData]] = {v: [] for v in variants}
    for index, case in enumerate(names):
        truth_image = sitk.ReadImage(str(phantom / "test_groundtruth" / f"{case}.nii.gz"))
        truth = np.rint(sitk.GetArrayFromImage(truth_image)).astype(np.uint8)
        order = variants if index % 2 == 0 else variants[::-1]  # alternate: load drifts hit both alike
        for variant in order:
            path = cache / variant / f"{case}.npz"
            if path.is_file():
                stored = np.load(path)
                results[variant].append(CaseData(case, truth, stored["raw"], stored["lesion"],
                                                 tuple(stored["spacing"]), float(stored["seconds"])))
                continue
            if variant not in predictors:
                predictor = load_predictor(model, mode=PredictionMode.fast())
                if variant == "lesion_mirror":
                    _mirror_lesion_channel(predictor)
                predictors[variant] = predictor
            predictor = predictors[variant]
            pm, cm = predictor.plans_manager, predictor.configuration_manager
            start = time.perf_counter()
            data, _, properties = cm.preprocessor_class(verbose=False).run_case(
                [str(cases[case])], None, pm, cm, predictor.dataset_json)
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data))
            segmentation, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, pm, cm, predictor.label_manager, properties, return_probabilities=True)
            seconds = time.perf_counter() - start
            spacing = tuple(float(s) for s in properties["spacing"])
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.tmp.npz")
            np.savez_compressed(tmp, raw=segmentation.astype(np.uint8), lesion=probabilities[2].astype(np.float16),
                                spacing=np.array(spacing), seconds=seconds)
            os.replace(tmp, path)
            results[variant].append(CaseData(case, truth, segmentation.astype(np.uint8),
                                             probabilities[2].astype(np.float16), spacing, seconds))
        if (index + 1) % 20 == 0:
            print(f"  {index + 1}/{len(names)} cases", flush=True)
    return results


def overhead(model: Path, phantom: Path, n_cases: int, repeats: int = 3) -> None:
    """Seconds per case of the export without and with lesion scoring, alternating on the same logits."""
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    from nnunet_mtl.inference.lesion_filters import postprocess
    from nnunet_mtl.inference.predict import PredictionMode, list_cases, load_predictor

    predictor = load_predictor(model, mode=PredictionMode.fast())
    pm, cm, lm = predictor.plans_manager, predictor.configuration_manager, predictor.label_manager
    times = {"whole case (fast)": [], "export, main": [], "export + lesion scores": []}
    for _, image in sorted(list_cases(phantom / "test").items())[:n_cases]:
        start = time.perf_counter()
        data, _, properties = cm.preprocessor_class(verbose=False).run_case([str(image)], None, pm, cm,
                                                                            predictor.dataset_json)
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data))
        times["whole case (fast)"].append(time.perf_counter() - start)
        for repeat in range(repeats):
            for variant in (("main", "scored") if repeat % 2 == 0 else ("scored", "main")):
                start = time.perf_counter()
                if variant == "main":
                    convert_predicted_logits_to_segmentation_with_correct_shape(logits, pm, cm, lm, properties)
                    times["export, main"].append(time.perf_counter() - start)
                else:
                    segmentation, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
                        logits, pm, cm, lm, properties, return_probabilities=True)
                    postprocess(segmentation, probabilities, properties["spacing"])
                    times["export + lesion scores"].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:<26} {np.mean(values):.3f} s per case (median {np.median(values):.3f}, n={len(values)})")
    extra = np.mean(times["export + lesion scores"]) - np.mean(times["export, main"])
    print(f"lesion scores add {extra:.3f} s per case = {100 * extra / np.mean(times['whole case (fast)']):.1f} % of a "
          "fast-mode case (preprocessing + network; export not included there)")


def lower_lesion_threshold(raw: np.ndarray, lesion_probability: np.ndarray, threshold: float | None) -> np.ndarray:
    """The argmax mask with every gland voxel whose lesion probability reaches ``threshold`` relabelled lesion (a
    threshold below 0.5 grows and adds lesions the argmax left as pancreas); None: the mask unchanged."""
    if threshold is None:
        return raw
    mask = raw.copy()
    mask[(raw == 1) & (lesion_probability >= threshold)] = 2
    return mask


def score(cases: list[CaseData], keep_largest: bool, filters, lesion_threshold: float | None = None) -> list[dict]:
    """Per-case lesion-wise numbers after the postprocessing given (exactly as predict applies it), optionally
    after lowering the lesion threshold inside the gland first."""
    from nnunet_mtl.evaluation.lesions import match_case
    from nnunet_mtl.evaluation.metrics import dice
    from nnunet_mtl.inference.lesion_filters import postprocess
    from nnunet_mtl.inference.postprocessing import keep_largest_component

    rows = []
    for c in cases:
        mask = lower_lesion_threshold(c.raw, c.lesion_probability, lesion_threshold)
        mask = keep_largest_component(mask) if keep_largest else mask
        probabilities = np.zeros((3, *mask.shape), np.float32)
        probabilities[2] = c.lesion_probability
        mask, candidates = postprocess(mask, probabilities, c.spacing, filters)
        lesions = match_case(mask, c.truth, c.spacing, c.case, [(k.peak, k.score) for k in candidates])
        rows.append({"lesions": lesions, "lesion_dice": dice(mask == 2, c.truth == 2),
                     "pancreas_dice": dice(mask > 0, c.truth > 0)})
    return rows


def per_case_vectors(rows: list[dict], bins: list[tuple[float, float]]) -> dict[str, np.ndarray]:
    vectors = {"fp": [], "lesion_dice": [], "pancreas_dice": [], "large_found": [], "large_total": [],
               "dice_sum": [], "dice_n": []}
    for k in range(len(bins)):
        vectors[f"found_{k}"], vectors[f"total_{k}"] = [], []
    for row in rows:
        truth = row["lesions"].truth
        vectors["fp"].append(sum(p.false_positive for p in row["lesions"].predicted))
        vectors["lesion_dice"].append(row["lesion_dice"])
        vectors["pancreas_dice"].append(row["pancreas_dice"])
        vectors["large_found"].append(sum(t.detected for t in truth if t.volume_ml >= MIN_VOLUME_ML))
        vectors["large_total"].append(sum(t.volume_ml >= MIN_VOLUME_ML for t in truth))
        vectors["dice_sum"].append(sum(t.dice for t in truth if t.detected))
        vectors["dice_n"].append(sum(t.detected for t in truth))
        for k, (lo, hi) in enumerate(bins):
            vectors[f"found_{k}"].append(sum(t.detected for t in truth if lo <= t.volume_ml < hi))
            vectors[f"total_{k}"].append(sum(lo <= t.volume_ml < hi for t in truth))
    return {k: np.asarray(v, dtype=float) for k, v in vectors.items()}


def statistics(v: dict[str, np.ndarray], n_bins: int) -> dict[str, float]:
    """The headline numbers of one (possibly resampled) set of cases."""
    def ratio(a, b):
        return float(a.sum() / b.sum()) if b.sum() else float("nan")

    result = {"sens>=0.1ml": ratio(v["large_found"], v["large_total"]), "fp_per_case": float(v["fp"].mean()),
              "case_lesion_dice": float(v["lesion_dice"].mean()), "detected_dice": ratio(v["dice_sum"], v["dice_n"]),
              "pancreas_dice": float(v["pancreas_dice"].mean())}
    for k in range(n_bins):
        result[f"bin{k}"] = ratio(v[f"found_{k}"], v[f"total_{k}"])
    return result


def bootstrap(v: dict[str, np.ndarray], n_bins: int, reference: dict[str, np.ndarray] | None, draws: int,
              seed: int) -> dict[str, tuple[float, float, float]]:
    """(value, low, high) per statistic, and the paired difference to ``reference`` (same resampled cases)."""
    rng = np.random.default_rng(seed)
    n = len(v["fp"])
    point = statistics(v, n_bins)
    samples = {k: [] for k in point}
    differences = {k: [] for k in point}
    reference_point = statistics(reference, n_bins) if reference is not None else None
    for _ in range(draws):
        index = rng.integers(0, n, n)
        s = statistics({k: a[index] for k, a in v.items()}, n_bins)
        for k in point:
            samples[k].append(s[k])
        if reference is not None:
            r = statistics({k: a[index] for k, a in reference.items()}, n_bins)
            for k in point:
                differences[k].append(s[k] - r[k])
    warnings.filterwarnings("ignore", message="All-NaN slice", category=RuntimeWarning)  # an empty size bin
    out = {k: (point[k], *np.nanpercentile(samples[k], [2.5, 97.5])) for k in point}
    if reference is not None:
        out.update({f"diff_{k}": (point[k] - reference_point[k], *np.nanpercentile(differences[k], [2.5, 97.5]))
                    for k in point})
    return out


def describe_missed_lesions(cases: list[CaseData], rows: list[dict], bins: list[tuple[float, float]],
                            bin_names: list[str]) -> list[str]:
    """Why true lesions are missed, by size: a missed lesion is either *touched* (a predicted lesion overlaps it,
    but with IoU <= 0.1: too large or too small a blob) or *unseen*; for both, the peak lesion probability inside
    it says whether the network saw it at all (>= 0.5: the argmax had it and postprocessing or matching lost it)."""
    from scipy import ndimage

    from nnunet_mtl.evaluation.lesions import label_components

    lesions = []  # (volume ml, detected, best IoU, peak lesion probability inside) of every true lesion
    for c, r in zip(cases, rows):
        if not r["lesions"].truth:
            continue
        truth_labels, n = label_components(c.truth == 2)  # the numbering match_case gave its true lesions
        peaks = ndimage.maximum(c.lesion_probability.astype(np.float32), truth_labels, np.arange(1, n + 1))
        lesions += [(t.volume_ml, t.detected, t.best_iou, float(peaks[t.index - 1])) for t in r["lesions"].truth]
    lines = []
    for (lo, hi), name in zip(bins, bin_names):
        in_bin = [lesion for lesion in lesions if lo <= lesion[0] < hi]
        missed = np.array([peak for _, found, _, peak in in_bin if not found] or [np.nan])
        seen = np.array([peak for _, found, _, peak in in_bin if found] or [np.nan])
        touched = sum(not found and iou > 0 for _, found, iou, _ in in_bin)
        unseen = sum(not found and iou == 0 for _, found, iou, _ in in_bin)
        lines.append(f"{name + ' ml':<12} found {len(in_bin) - touched - unseen}, missed {touched + unseen} (touched "
                     f"{touched}, unseen {unseen}); peak lesion probability inside: missed median "
                     f"{np.nanmedian(missed):.2f} (>= 0.5: {int((missed >= 0.5).sum())}, 0.2-0.5: "
                     f"{int(((missed >= 0.2) & (missed < 0.5)).sum())}, < 0.2: {int((missed < 0.2).sum())}), found "
                     f"median {np.nanmedian(seen):.2f}")
    return lines


def describe_false_lesions(rows: list[dict], edges=(0.01, 0.05, 0.2)) -> str:
    false = [p for r in rows for p in r["lesions"].predicted if p.false_positive]
    bounds = [0.0, *edges, float("inf")]
    sizes = ", ".join(f"{lo:g}-{hi:g} ml: {sum(lo <= p.volume_ml < hi for p in false)}"
                      for lo, hi in zip(bounds[:-1], bounds[1:]))
    where = ", ".join(f"{loc} {sum(p.location == loc for p in false)}" for loc in ("inside", "border", "outside"))
    scores = np.array([p.score for p in false]) if false else np.array([np.nan])
    return (f"{len(false)} false lesions in {len(rows)} cases; by size {sizes}; by location (true gland) {where}; "
            f"score median {np.nanmedian(scores):.3f}, >= 0.9: {int((scores >= 0.9).sum())}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="trained model folder")
    parser.add_argument("--phantom", type=Path, required=True, help="phantom folder with test/ and test_groundtruth/")
    parser.add_argument("--cache", type=Path, default=None, help="folder for cached predictions (default: none)")
    parser.add_argument("--variants", default="fast", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bins", default="0.2,1,5", help="true-lesion size bin edges in ml (default 0.2,1,5)")
    parser.add_argument("--lesion-thresholds", default="0.4,0.3,0.2",
                        help="lesion probabilities below 0.5 at which a gland voxel becomes lesion, each scored as a "
                             "setting (default 0.4,0.3,0.2; empty: none)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    parser.add_argument("--overhead", type=int, default=0, metavar="N",
                        help="only measure what scoring lesion components adds to predict, on N cases")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if not (args.phantom / "test").is_dir() or not (args.phantom / "test_groundtruth").is_dir():
        parser.error(f"{args.phantom} has no test/ and test_groundtruth/ folders")

    if args.overhead:
        print(f"load before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
        overhead(args.model, args.phantom, args.overhead)
        print(f"load after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
        return 0

    from nnunet_mtl.evaluation.lesions import froc, sensitivity_at_fp, summarise
    from nnunet_mtl.inference.lesion_filters import NO_FILTERS, LesionFilters, read_lesion_filters
    from nnunet_mtl.inference.postprocessing import read_decision

    thresholds = [float(t) for t in args.lesion_thresholds.split(",") if t.strip()]
    edges = [float(e) for e in args.bins.split(",")]
    bounds = [0.0, *edges, float("inf")]
    bins = list(zip(bounds[:-1], bounds[1:]))
    bin_names = [f"<{edges[0]:g}" if lo == 0 else f">={lo:g}" if np.isinf(hi) else f"{lo:g}-{hi:g}" for lo, hi in bins]
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"load before: {load}")
    cache = args.cache or Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_lesions_{os.getpid()}"
    data = predict_cases(args.model, args.phantom, variants, cache, args.max_cases)
    print(f"load after prediction: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    keep_largest = read_decision(args.model)
    chosen = read_lesion_filters(args.model)
    settings: list[tuple[str, bool, object, float | None]] = [
        ("raw (no postprocessing)", False, NO_FILTERS, None),
        (f"today (largest component {keep_largest})", keep_largest, NO_FILTERS, None)]
    if not keep_largest:
        settings.append(("largest component on", True, NO_FILTERS, None))
        settings.append(("lesions outside the gland dropped", False, LesionFilters(drop_outside_gland=True), None))
    settings += [(f"min volume {v:g} ml", keep_largest, LesionFilters(min_volume_ml=v), None)
                 for v in VOLUME_STEPS_ML]
    settings += [(f"min probability {p:g}", keep_largest, LesionFilters(min_probability=p), None)
                 for p in PROBABILITY_STEPS]
    settings += [(f"min volume {v:g} ml + min probability {p:g}", keep_largest,
                  LesionFilters(min_volume_ml=v, min_probability=p), None) for v, p in COMBINED_STEPS]
    settings.append((f"validation's choice ({chosen.describe()})", keep_largest, chosen, None))
    for t in thresholds:
        settings.append((f"lesion threshold {t:g}", keep_largest, NO_FILTERS, t))
        settings += [(f"lesion threshold {t:g} + min probability {p:g}", keep_largest,
                      LesionFilters(min_probability=p), t) for p in PROBABILITY_STEPS if p > t]

    report: dict = {"load": load, "model": str(args.model), "phantom": str(args.phantom), "variants": {}}
    header = (f"{'setting':<44}{'sens>=0.1ml':>22}{'FP/case':>20}{'case lesion Dice':>22}{'detected Dice':>20}"
              + "".join(f"{n + ' ml':>13}" for n in bin_names))
    for variant in variants:
        cases = data[variant]
        seconds = np.array([c.seconds for c in cases])
        print(f"\n=== {variant}: {len(cases)} cases, {seconds.mean():.2f} s per case (prediction incl. "
              f"preprocessing and resampling; median {np.median(seconds):.2f})")
        reference = None
        report["variants"][variant] = {"seconds_per_case": float(seconds.mean()), "settings": {}}
        print(header)
        for name, largest, filters, threshold in settings:
            rows = score(cases, largest, filters, threshold)
            vectors = per_case_vectors(rows, bins)
            if name.startswith("today"):
                reference = vectors
                today_rows = rows
            if name.startswith("validation's choice"):
                chosen_rows = rows
            stats = bootstrap(vectors, len(bins), reference if not name.startswith(("raw", "today")) else None,
                              args.bootstrap, args.seed)
            counts = [f"{int(vectors[f'found_{k}'].sum())}/{int(vectors[f'total_{k}'].sum())}"
                      for k in range(len(bins))]

            def show(key, stats=stats):
                value, low, high = stats[key]
                return f"{value:.3f} [{low:.3f},{high:.3f}]"

            print(f"{name:<44}{show('sens>=0.1ml'):>22}{show('fp_per_case'):>20}{show('case_lesion_dice'):>22}"
                  f"{show('detected_dice'):>20}" + "".join(f"{c:>13}" for c in counts))
            if "diff_case_lesion_dice" in stats:
                print(f"{'  vs today':<44}{show('diff_sens>=0.1ml'):>22}{show('diff_fp_per_case'):>20}"
                      f"{show('diff_case_lesion_dice'):>22}{show('diff_detected_dice'):>20}")
            report["variants"][variant]["settings"][name] = {"stats": stats, "counts": dict(zip(bin_names, counts))}
        print("false lesions, today:", describe_false_lesions(today_rows))
        raw_rows = score(cases, False, NO_FILTERS)
        print("false lesions, no postprocessing:", describe_false_lesions(raw_rows))
        summary = summarise([r["lesions"] for r in today_rows], edges, MIN_VOLUME_ML)
        curve = froc([r["lesions"] for r in today_rows], MIN_VOLUME_ML)
        points = [sensitivity_at_fp(curve, b) for b in (0.1, 0.3, 1.0)]
        print("FROC of today's masks (lesions >= 0.1 ml; threshold chosen on this test set, optimistic): "
              + ", ".join(f"{p['sensitivity']:.3f} at {p['fp_per_case']:.2f} FP/case (score >= {p['threshold']})"
                          for p in points))
        for t in thresholds:
            rows = score(cases, keep_largest, NO_FILTERS, t)
            curve_t = froc([r["lesions"] for r in rows], MIN_VOLUME_ML)
            points_t = [sensitivity_at_fp(curve_t, b) for b in (0.1, 0.3, 1.0)]
            print(f"FROC at lesion threshold {t:g} (optimistic, as above): "
                  + ", ".join(f"{p['sensitivity']:.3f} at {p['fp_per_case']:.2f} FP/case (score >= {p['threshold']})"
                              for p in points_t))
            report["variants"][variant][f"froc_threshold_{t:g}"] = points_t
        for title, missed_rows in (("no postprocessing", raw_rows),
                                   ("the validation's choice of postprocessing", chosen_rows)):
            print(f"missed true lesions by size, {title}:")
            for line in describe_missed_lesions(cases, missed_rows, bins, bin_names):
                print("  " + line)
        missed = sorted(t.volume_ml for r in today_rows for t in r["lesions"].truth if not t.detected)
        print(f"missed true lesions (ml): {[round(v, 3) for v in missed]}")
        report["variants"][variant]["froc"] = points
        report["variants"][variant]["summary_today"] = {k: summary[k] for k in ("by_size", "false_positives",
                                                                                "sensitivity_min_volume")}
    if len(variants) > 1:
        times = {v: np.array([c.seconds for c in data[v]]) for v in variants}
        print("\nseconds per case side by side: " + ", ".join(f"{v} {t.mean():.2f}" for v, t in times.items())
              + "; ratio " + " / ".join(f"{times[v].mean() / times[variants[0]].mean():.2f}" for v in variants))
    print(f"load after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
