"""The summary of `bench/real_scale.py`: figures per stage, the bars, and the 1000 x 250 protocol projected."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

REPORT_GPU_EPOCH_SECONDS = 165.0  # the report: default network, 250 iterations per epoch, RTX 3060 Ti
EPOCHS, ITERATIONS, VAL_ITERATIONS = 1000, 250, 50
CASE_VALIDATION_SHARE = 0.10  # case-level validation may cost at most this share of training time


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds < 96 * 3600 else f"{seconds / 86400:.0f} days"


def predict_figures(state: dict) -> dict[str, dict]:
    """Per mode: mean seconds per case over its chunks, best of its rounds; its peak memory."""
    rounds: dict[str, dict[str, dict[str, float]]] = {}
    modes: dict[str, dict] = {}
    for key, value in state.items():
        if not key.startswith("predict:"):
            continue
        _, mode, round_, _ = key.split(":")
        rounds.setdefault(mode, {}).setdefault(round_, {}).update(value["seconds_per_case"])
        entry = modes.setdefault(mode, {"peak_gb": 0.0, "loads": []})
        entry["peak_gb"] = max(entry["peak_gb"], value["tree_peak_gb"])
        entry["loads"] += value.get("load", [])
    for mode, per_round in rounds.items():
        best = min(per_round.values(), key=lambda r: _mean(r.values()))
        modes[mode].update(seconds_per_case=_mean(best.values()), cases=len(best), per_case=best)
    return modes


def paired_ratio(modes: dict[str, dict], a: str, b: str) -> tuple[float, int]:
    """Mean seconds per case of mode ``a`` over that of ``b``, on the cases both measured (modes may have run on
    different numbers of cases: stock's hours-long runs stop early), and how many cases that is."""
    if a not in modes or b not in modes:
        return math.nan, 0
    shared = sorted(set(modes[a]["per_case"]) & set(modes[b]["per_case"]))
    if not shared:
        return math.nan, 0
    return (_mean(modes[a]["per_case"][c] for c in shared) / _mean(modes[b]["per_case"][c] for c in shared),
            len(shared))


def all_subtypes(folder: Path) -> dict[str, str]:
    """Subtypes of every chunk of a mode's predictions."""
    from predict_speed import subtypes

    found: dict[str, str] = {}
    for chunk in sorted(folder.glob("chunk_*")):
        found.update(subtypes(chunk))
    return found


def quality(workdir: Path, modes: list[str]) -> dict[str, dict]:
    """Dice of each mode against the truth and against stock's masks; subtype agreement with default mode."""
    import SimpleITK as sitk
    from profile_fast import compare_masks, dice

    predictions, truth = workdir / "predictions", workdir / "phantom" / "test_groundtruth"
    out = {}
    for mode in modes:
        masks = {p.name[: -len(".nii.gz")]: p for p in sorted((predictions / mode).glob("chunk_*/quiz_*.nii.gz"))}
        if not masks:
            continue
        pancreas, lesion = [], []
        for case, path in masks.items():
            p = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
            t = sitk.GetArrayFromImage(sitk.ReadImage(str(truth / f"{case}.nii.gz")))
            pancreas.append(dice(p > 0, t > 0))
            lesion.append(dice(p == 2, t == 2))
        row = {"cases": len(masks), "pancreas_dice": _mean(pancreas), "lesion_dice": _mean(lesion)}
        stock = {p.name[: -len(".nii.gz")] for p in (predictions / "stock").glob("chunk_*/quiz_*.nii.gz")}
        shared = sorted(set(masks) & stock)  # an interrupted stock run leaves some cases without a stock mask
        if mode != "stock" and shared:
            row["vs_stock"] = compare_masks(predictions / "stock", predictions / mode, shared, nested=True)
        reference, mine = all_subtypes(predictions / "default"), all_subtypes(predictions / mode)
        if reference and mine and mode != "default":
            row["subtype_same_as_default"] = sum(mine.get(k) == v for k, v in reference.items()) / len(reference)
        out[mode] = row
    return out


def print_summary(state: dict, workdir: Path) -> None:
    import os

    print(f"\nreal-scale rehearsal in {workdir}; load average now {os.getloadavg()[0]:.1f} "
          f"({os.cpu_count()} cores)")
    setup = state.get("setup", {})
    print(f"phantom preset {setup.get('preset')}, seed {setup.get('seed')}, "
          f"counts {state.get('phantom', {}).get('counts')}")
    print(f"\n{'stage':<22}{'seconds':>10}{'tree GB':>9}{'process GB':>12}{'child GB':>10}  load (1 min, start -> end)")
    for key, value in state.items():
        if isinstance(value, dict) and "seconds" in value and "tree_peak_gb" in value:
            load = value.get("load") or ["?", "?"]
            print(f"{key:<22}{value['seconds']:>10.0f}{value['tree_peak_gb']:>9.2f}{value['process_peak_gb']:>12.2f}"
                  f"{value['largest_child_peak_gb']:>10.2f}  {load[0]} -> {load[1]}")
    peaks = [v["tree_peak_gb"] for v in state.values() if isinstance(v, dict) and "tree_peak_gb" in v]
    if peaks:
        print(f"largest peak: {max(peaks):.2f} GB. tree: the stage's processes together (sum of their PSS, sampled "
              "every 0.5 s); process: the stage's own peak RSS; child: the largest peak RSS of a worker it spawned")

    plan = state.get("plan")
    if plan:
        for p in plan["plans"].values():
            print(f"plans {p['plans']}: patch {p['patch_size']}, batch {p['batch_size']}, spacing "
                  f"{[round(s, 3) for s in p['spacing']]}, features {p['features']}")
        print(f"preprocessed data: {plan['preprocessed_gb']:.2f} GB; planning seconds {plan['seconds_per_planner']}")

    bars = []
    for key in sorted(k for k in state if k.startswith("train:")):
        t = state[key]
        m = t["median_step_seconds"]
        print(f"\ntrain {key.split(':')[1]} ({t['plans']}, patch {t['patch_size']}, batch {t['batch_size']}): "
              f"{t['steps_each']} steps each after a warm-up, alternated")
        print(f"  multi-task {m['multi-task']:.2f} s/iteration, stock nnUNetTrainer {m['stock']:.2f} s "
              f"(median); ratio {t['ratio']:.3f}")
        print(f"  every step: multi-task {[round(x, 1) for x in t['step_seconds']['multi-task']]}, "
              f"stock {[round(x, 1) for x in t['step_seconds']['stock']]}")
        print(f"  data loading + augmentation {_mean(t['data_loading_seconds']):.2f} s/batch (in the main process "
              f"here; nnU-Net's workers overlap it on a GPU machine), validation step "
              f"{_mean(t['validation_step_seconds']):.2f} s")
        if key == "train:default":
            bars.append(("multi-task train step <= 1.05 x stock (default plans)", t["ratio"] <= 1.05,
                         f"{t['ratio']:.3f}"))

    for key in sorted(k for k in state if k.startswith("validate:")):
        v = state[key]
        print(f"\ncase-level validation {key.split(':')[1]}: {v['cases']} cases in {v['seconds']:.0f} s "
              f"({v['seconds_per_case']:.1f} s/case; network {v['network_seconds']:.0f} s in "
              f"{v['forward_passes']} forward passes)")

    profile = state.get("profile")
    if profile:
        resamplers = [r for r in ("plans", "torch") if r in profile]
        print(f"\nfast mode, step by step ({profile['cases']} cases, seconds per case; wall / CPU of the process):")
        print(f"  {'step':<18}" + "".join(f"{r + ' resampler':>22}" for r in resamplers))
        for step in profile[resamplers[0]]["steps_per_case"]:
            cells = []
            for r in resamplers:
                cpu = profile[r].get("cpu_seconds_per_case", {}).get(step)
                cells.append(f"{profile[r]['steps_per_case'][step]:>12.2f} / " + (f"{cpu:<7.2f}" if cpu is not None
                                                                                  else f"{'':<7}"))
            print(f"  {step:<18}" + "".join(cells))
        print(f"  {'total':<18}" + "".join(f"{profile[r]['seconds_per_case']:>12.2f}{'':>10}" for r in resamplers))
        if "torch_vs_plans_masks" in profile:
            c = profile["torch_vs_plans_masks"]
            print(f"  torch vs plans resampler, exported masks: whole-pancreas Dice {c['pancreas_dice']:.4f} "
                  f"(min {c['min_pancreas_dice']:.4f}), lesion Dice {c['lesion_dice']:.4f} (min "
                  f"{c['min_lesion_dice']:.4f}), voxels differing {100 * c['voxels_differing']:.3f} %, subtype "
                  f"agreement {100 * profile['subtype_agreement']:.0f} %")
        truth = profile.get("resamplers_on_truth")
        if truth:
            print(f"  both resamplers on the truth ({truth['cases']} cases; smooth one-hot logits exported back): "
                  f"masks agree with Dice {truth['pancreas_dice']:.4f} (min {truth['min_pancreas_dice']:.4f}) "
                  f"whole pancreas, {truth['lesion_dice']:.4f} (min {truth['min_lesion_dice']:.4f}) lesion; against "
                  f"the truth: plans {truth['plans_vs_truth_pancreas']:.4f} / {truth['plans_vs_truth_lesion']:.4f}, "
                  f"torch {truth['torch_vs_truth_pancreas']:.4f} / {truth['torch_vs_truth_lesion']:.4f}; "
                  f"preprocessed images: correlation {truth['image_correlation']:.5f}, mean |difference| "
                  f"{truth['image_mean_abs_difference']:.4f} (normalised units)")

    modes = predict_figures(state)
    if modes:
        q = quality(workdir, list(modes))
        print("\nprediction, each mode in its own process; s/case over the cases each mode ran, the ratios on the "
              "cases both modes ran (Dice against the phantom truth; the model has trained a few steps only, so only "
              "the differences between modes mean something)")
        print(f"  {'mode':<10}{'cases':>6}{'s/case':>9}{'x stock':>9}{'/ floor':>9}{'pancreas':>10}{'lesion':>8}"
              f"{'vs stock: pancreas':>20}{'lesion':>8}{'subtype=default':>17}{'peak GB':>9}")
        for mode, m in modes.items():
            s, r = m["seconds_per_case"], q.get(mode, {})
            vs = r.get("vs_stock", {})
            print(f"  {mode:<10}{m['cases']:>6}{s:>9.2f}{paired_ratio(modes, 'stock', mode)[0]:>9.2f}"
                  f"{paired_ratio(modes, mode, 'floor')[0]:>9.2f}{r.get('pancreas_dice', math.nan):>10.4f}"
                  f"{r.get('lesion_dice', math.nan):>8.4f}{vs.get('pancreas_dice', math.nan):>20.4f}"
                  f"{vs.get('lesion_dice', math.nan):>8.4f}"
                  f"{100 * r.get('subtype_same_as_default', math.nan):>16.0f}%{m['peak_gb']:>9.2f}")
        for name, a, b, test in (("fast >= 5x faster than stock", "stock", "fast", lambda x: x >= 5),
                                 ("fast <= 1.5x the one-pass floor", "fast", "floor", lambda x: x <= 1.5),
                                 ("default mode no slower than stock", "default", "stock", lambda x: x <= 1.0)):
            ratio, n = paired_ratio(modes, a, b)
            if n:
                bars.append((name, test(ratio), f"{a} / {b} = {ratio:.3f} on {n} cases"))

    project(state)
    if peaks:
        bars.append(("nothing over 24 GB", max(peaks) <= 24.0, f"largest {max(peaks):.2f} GB"))
    if bars:
        print("\nbars:")
        for name, met, figure in bars:
            print(f"  {'met    ' if met else 'NOT met'}  {name}: {figure}")


def project(state: dict) -> None:
    """The 1000 x 250 protocol's wall time from the measured figures."""
    train = state.get("train:default")
    if not train:
        return
    step = train["median_step_seconds"]["multi-task"]
    loading = _mean(train["data_loading_seconds"])
    val_step = _mean(train["validation_step_seconds"])
    validate = state.get("validate:default")
    case_val = validate["seconds"] if validate else 0.0
    default = predict_figures(state).get("default")  # the final validation predicts in default mode
    final_validation = default["seconds_per_case"] * (validate["cases"] if validate else 36) if default else 0.0
    epoch_cpu = ITERATIONS * step + VAL_ITERATIONS * val_step
    print("\nthe 1000 epochs x 250 iterations protocol, projected (default plans):")
    print(f"  this CPU: {ITERATIONS} x {step:.1f} s + {VAL_ITERATIONS} validation steps x {val_step:.1f} s = "
          f"{epoch_cpu:.0f} s per epoch (+ {ITERATIONS * loading:.0f} s if data loading does not overlap); "
          f"1000 epochs = {_hours(EPOCHS * epoch_cpu)} "
          f"(+ case-level validation {case_val:.0f} s each time, final validation {final_validation:.0f} s)")
    if not validate:
        return
    # On a GPU the network part shrinks by the ratio of the report's step time to ours; the rest (loading the
    # preprocessed case, connected components, Dice) stays CPU work, measured here.
    gpu_step = REPORT_GPU_EPOCH_SECONDS / ITERATIONS
    speedup = train["median_step_seconds"]["stock"] / gpu_step
    case_val_gpu = (validate["seconds"] - validate["network_seconds"]) + validate["network_seconds"] / speedup
    cadence = max(1, math.ceil(case_val_gpu / (CASE_VALIDATION_SHARE * REPORT_GPU_EPOCH_SECONDS)))
    print(f"  the report's GPU ({REPORT_GPU_EPOCH_SECONDS:.0f} s per epoch, {gpu_step:.2f} s per step, "
          f"{speedup:.0f}x this CPU's step): one case-level validation about {case_val_gpu:.0f} s "
          f"(CPU part {validate['seconds'] - validate['network_seconds']:.0f} s as measured here + network "
          f"{validate['network_seconds']:.0f} s / {speedup:.0f})")
    for every in sorted({1, 5, 10, cadence}):
        share = case_val_gpu / every / REPORT_GPU_EPOCH_SECONDS
        total = EPOCHS * (REPORT_GPU_EPOCH_SECONDS + case_val_gpu / every)
        print(f"    every {every:>2} epochs: +{100 * share:.1f} % of training time, 1000 epochs = {_hours(total)}")
    print(f"  smallest cadence under {100 * CASE_VALIDATION_SHARE:.0f} %: every {cadence} epochs")
