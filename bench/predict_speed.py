"""Prediction speed and accuracy, measured side by side in one run on the same model and cases.

Modes (each run in its own process, so peak memory is its own; rounds alternate the modes):
  stock     nnU-Net's own predictor, default settings (step 0.5, mirroring), segmentation only, predict_from_files
  default   ours, nnU-Net's settings, masks + subtype
  default_mirrored_tile  default with the subtype's lesion tile mirrored too (8 encoder passes; the old default)
  fast      ours --fast, masks + subtype
  fast_seg  ours --fast with the classification head switched off (to price the subtype)
  floor     one forward pass of the network over each preprocessed crop (padded to the stride): the lower bound

``--engines`` runs the ours modes (default, default_mirrored_tile, fast, fast_seg, floor) once per
engine:precision (torch:fp32, torch:bf16, openvino:fp32, openvino:bf16, onnxruntime:fp32); stock is nnU-Net's own
(torch fp32). Exports are made before timing starts (they happen once per checkpoint), compiling for each input shape
is timed.

Prints seconds per case, ratios (to stock, to the same engine's floor, to fast with torch fp32), whole-pancreas and
lesion Dice of each mode against the truth, the Dice between each fast mode's masks and those of fast torch fp32,
the share of cases whose subtype differs from fast torch fp32 (and from default mode), the largest subtype
probability difference, and peak resident memory.

  python bench/predict_speed.py --model MODEL --images phantom/test --truth phantom/test_groundtruth
  python bench/predict_speed.py --workdir work          # the demo's model and phantom test set
  python bench/predict_speed.py --workdir work --modes fast floor --engines torch:fp32 openvino:bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("stock", "default", "default_mirrored_tile", "fast", "fast_seg", "floor")
ENGINE_VARIANTS = ("torch:fp32", "torch:bf16", "openvino:fp32", "openvino:bf16", "onnxruntime:fp32")
REFERENCE = "fast@torch:fp32"


def prepare_exports(model: Path, engine: str, precision: str) -> None:
    """Export the network once (as a first prediction would), so that timing shows the per-case cost."""
    import torch

    from nnunet_mtl.inference.predict import PredictionMode, load_predictor

    if engine == "torch":
        return
    predictor = load_predictor(model, mode=PredictionMode.fast(engine=engine, precision=precision))
    for index, parameters in enumerate(predictor.list_of_parameters):
        predictor.network.load_state_dict(parameters)
        predictor.fold_index = index
        predictor._bind_engine()
        predictor.engine.onnx_file("network")
        predictor.engine.onnx_file("classify")
    del torch


def run_mode(mode: str, model: Path, images: Path, out: Path, device: str, engine: str = "torch",
             precision: str = "fp32") -> dict:
    """Runs in a child process; returns timing for all cases of the folder."""
    import numpy as np
    import torch

    from nnunet_mtl.inference.predict import PredictionMode, list_cases, load_predictor, predict_folder
    from nnunet_mtl.training.run import resolve_device

    dev = resolve_device(device)
    cases = list_cases(images)
    options = {"engine": engine, "precision": precision}
    if mode == "stock":
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        ours = load_predictor(model, device=dev)
        network = ours.network
        network.return_classification = False
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, device=dev,
                                    allow_tqdm=False)
        predictor.manual_initialization(network, ours.plans_manager, ours.configuration_manager,
                                        ours.list_of_parameters, ours.dataset_json, "nnUNetTrainerMTL",
                                        ours.allowed_mirroring_axes)
        n_proc = int(os.environ.get("nnUNet_def_n_proc", "2"))
        start = time.perf_counter()
        predictor.predict_from_files(str(images), str(out), save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=n_proc, num_processes_segmentation_export=n_proc)
        seconds = time.perf_counter() - start
    elif mode == "floor":
        predictor = load_predictor(model, device=dev, mode=PredictionMode(**options))
        pm, cm = predictor.plans_manager, predictor.configuration_manager
        predictor.network.to(dev).eval()
        predictor._bind_engine()
        stride = np.prod(np.array(cm.pool_op_kernel_sizes), axis=0)
        seconds = 0.0
        for image in cases.values():
            data, _, _ = cm.preprocessor_class(verbose=False).run_case([str(image)], None, pm, cm,
                                                                       predictor.dataset_json)
            shape = np.array(data.shape[1:])
            padded = (np.ceil(shape / stride) * stride).astype(int)
            x = torch.zeros((1, 1, *padded), device=dev)
            with torch.inference_mode():
                start = time.perf_counter()  # a new shape: compiling for it counts, as it does in fast mode
                predictor.engine.forward(x)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                seconds += time.perf_counter() - start
    else:
        fast = mode.startswith("fast")
        # fast_seg: the same fast predictor with the head switched off, to price the subtype
        # default_mirrored_tile: default mode with the subtype's lesion tile mirrored too (before 2026-12-01)
        prediction_mode = PredictionMode.fast(classify=mode != "fast_seg", **options) if fast \
            else PredictionMode(lesion_tile_mirroring=mode == "default_mirrored_tile", **options)
        start = time.perf_counter()
        report = predict_folder(model, images, out, device=dev, mode=prediction_mode, overwrite=True,
                                progress=False)
        seconds = time.perf_counter() - start
        if report.failed:
            raise RuntimeError(report.failed)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "seconds": seconds, "cases": len(cases), "peak_rss_mb": peak_mb}


def mask_agreement(pred_dir: Path, reference_dir: Path) -> dict:
    """Mean Dice between two predictions' masks (whole pancreas, lesion), case by case."""
    pancreas, lesion = mean_dice(pred_dir, reference_dir)
    return {"pancreas": pancreas, "lesion": lesion}


def mean_dice(pred_dir: Path, reference_dir: Path) -> tuple[float, float]:
    """Case-mean whole-pancreas (label > 0) and lesion (label 2) Dice of ``pred_dir``'s masks against the masks of
    ``reference_dir`` (the truth, or another mode's prediction), over the cases predicted: a truth folder may hold
    more cases than ``--images``."""
    import numpy as np
    import SimpleITK as sitk

    from nnunet_mtl.evaluation.metrics import dice

    pancreas, lesion = [], []
    for predicted in sorted(pred_dir.glob("*.nii.gz")):
        p = sitk.GetArrayFromImage(sitk.ReadImage(str(predicted)))
        r = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_dir / predicted.name)))
        pancreas.append(dice(p > 0, r > 0))
        lesion.append(dice(p == 2, r == 2))
    return float(np.mean(pancreas)), float(np.mean(lesion))


def probabilities(pred_dir: Path) -> dict:
    from nnunet_mtl.inference.outputs import read_probability_table

    return read_probability_table(pred_dir) if (pred_dir / "subtype_probabilities.csv").is_file() else {}


def score(pred_dir: Path, truth: Path) -> dict:
    pancreas, lesion = mean_dice(pred_dir, truth)
    return {"pancreas_dice": pancreas, "lesion_dice": lesion}


def subtypes(pred_dir: Path) -> dict[str, str]:
    table = pred_dir / "subtype_results.csv"
    if not table.is_file():
        return {}
    return dict(line.split(",") for line in table.read_text().splitlines()[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("work"), help="demo work folder (default: work)")
    parser.add_argument("--model", type=Path, help="model folder (default: the demo's)")
    parser.add_argument("--images", type=Path, help="images folder (default: the demo's phantom test set)")
    parser.add_argument("--truth", type=Path, help="truth masks folder (default: the phantom's test truth)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; modes alternate within each (default 2)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--engines", nargs="+", default=["torch:fp32"], choices=ENGINE_VARIANTS,
                        help="engine:precision for our modes (default torch:fp32)")
    parser.add_argument("--keep", type=Path, help="keep every mode's predictions in this folder")
    parser.add_argument("--worker", nargs=6, metavar=("MODE", "ENGINE", "PRECISION", "MODEL", "IMAGES", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, engine, precision, model, images, out = args.worker
        print(json.dumps(run_mode(mode, Path(model), Path(images), Path(out), args.device, engine, precision)))
        return

    demo_model = "nnUNet_results/Dataset501_Pancreas/nnUNetTrainerMTL__nnUNetPlans_MTLdemo__3d_fullres"
    model = args.model or args.workdir / demo_model
    images = args.images or args.workdir / "phantom/test"
    truth = args.truth or args.workdir / "phantom/test_groundtruth"
    variants = [("stock", "torch", "fp32")] if "stock" in args.modes else []
    variants += [(m, *e.split(":")) for m in args.modes if m != "stock" for e in args.engines]
    name = {v: v[0] if v[0] == "stock" else f"{v[0]}@{v[1]}:{v[2]}" for v in variants}
    for engine in {e for _, e, _ in variants}:
        for precision in {p for _, e, p in variants if e == engine}:
            prepare_exports(model, engine, precision)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="predict_speed_", dir=args.keep))
    timings: dict[str, list[float]] = {name[v]: [] for v in variants}
    peaks: dict[str, float] = {}
    loads = []
    try:
        for _ in range(args.rounds):
            for variant in variants:
                mode, engine, precision = variant
                out = scratch / name[variant].replace("@", "_").replace(":", "_")
                loads.append(os.getloadavg()[0])
                result = subprocess.run([sys.executable, __file__, "--device", args.device, "--worker", mode, engine,
                                         precision, str(model), str(images), str(out)], capture_output=True, text=True)
                if result.returncode != 0:
                    sys.exit(f"{name[variant]} failed:\n{result.stderr[-3000:]}")
                row = json.loads(result.stdout.strip().splitlines()[-1])
                timings[name[variant]].append(row["seconds"] / row["cases"])
                peaks[name[variant]] = max(peaks.get(name[variant], 0.0), row["peak_rss_mb"])
        report(timings, peaks, variants, name, scratch, truth, model, images, args, loads)
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)


def report(timings, peaks, variants, name, scratch, truth, model, images, args, loads) -> None:
    best = {m: min(v) for m, v in timings.items()}
    folder = {name[v]: scratch / name[v].replace("@", "_").replace(":", "_") for v in variants}
    reference = folder.get(REFERENCE)
    reference_subtypes = subtypes(reference) if reference else {}
    reference_p = probabilities(reference) if reference else {}
    default_subtypes = subtypes(folder["default@torch:fp32"]) if "default@torch:fp32" in folder else {}
    print(f"model {model}\nimages {images} ({len(list(images.glob('*_0000.nii.gz')))} cases), device "
          f"{args.device}, best of {args.rounds} rounds; load average (1 min) while running: "
          f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores\n")
    print(f"{'mode':<24}{'s/case':>9}{'vs stock':>10}{'vs floor':>10}{'vs fast':>9}{'pancreas':>10}{'lesion':>8}"
          f"{'Dice to fast torch fp32':>25}{'subtype≠':>10}{'max Δp':>8}{'≠default':>10}{'peak MB':>9}")
    for variant in variants:
        mode, engine, precision = variant
        key = name[variant]
        seconds = best[key]
        quality = score(folder[key], truth) if mode != "floor" else {}
        floor = best.get(f"floor@{engine}:{precision}")
        ratio_stock = f"{best['stock'] / seconds:.2f}x" if "stock" in best else ""
        ratio_floor = f"{seconds / floor:.2f}" if floor and mode != "floor" else ""
        ratio_fast = f"{best[REFERENCE] / seconds:.2f}x" if REFERENCE in best and mode.startswith("fast") else ""
        agreement, changed, pdiff, changed_default = "", "", "", ""
        if mode.startswith("fast") and reference:
            a = mask_agreement(folder[key], reference)
            agreement = f"{a['pancreas']:.4f} / {a['lesion']:.4f}"
        if mode == "fast" and reference_subtypes:
            mine = subtypes(folder[key])
            changed = f"{sum(mine[k] != v for k, v in reference_subtypes.items())}/{len(reference_subtypes)}"
            p = probabilities(folder[key])
            pdiff = f"{max(abs(p[c] - reference_p[c]).max() for c in reference_p):.4f}"
        if mode == "fast" and default_subtypes:
            mine = subtypes(folder[key])
            changed_default = f"{sum(mine[k] != v for k, v in default_subtypes.items())}/{len(default_subtypes)}"
        print(f"{key:<24}{seconds:>9.3f}{ratio_stock:>10}{ratio_floor:>10}{ratio_fast:>9}"
              f"{quality.get('pancreas_dice', float('nan')):>10.4f}{quality.get('lesion_dice', float('nan')):>8.4f}"
              f"{agreement:>25}{changed:>10}{pdiff:>8}{changed_default:>10}{peaks[key]:>9.0f}")
    for engine in args.engines:
        fast, fast_seg = best.get(f"fast@{engine}"), best.get(f"fast_seg@{engine}")
        if fast and fast_seg:
            print(f"\nsubtype cost in fast mode ({engine}): {100 * (fast / fast_seg - 1):+.1f}% "
                  "of segmentation-only prediction time")
    print("'vs stock': times faster than stock; 'vs floor': time / the same engine's one forward pass over the crop;"
          " 'vs fast': times faster than fast torch fp32; Dice to fast torch fp32: whole pancreas / lesion")
    print(f"seconds per case, every round: { {k: [round(t, 3) for t in v] for k, v in timings.items()} }")


if __name__ == "__main__":
    main()
