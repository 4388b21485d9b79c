"""Prediction speed and accuracy, measured side by side in one run on the same model and cases.

Modes (each run in its own process, so peak memory is its own; rounds alternate the modes):
  stock     nnU-Net's own predictor, default settings (step 0.5, mirroring), segmentation only, predict_from_files
  default   ours, nnU-Net's settings, masks + subtype
  fast      ours --fast, masks + subtype
  fast_seg  ours --fast with the classification head switched off (to price the subtype)
  floor     one forward pass of the network over each preprocessed crop (padded to the stride): the lower bound

Prints seconds per case, ratios, whole-pancreas and lesion Dice of each mode against the truth, the share of cases
whose subtype differs from default mode, and peak resident memory.

  python bench/predict_speed.py --model MODEL --images phantom/test --truth phantom/test_groundtruth
  python bench/predict_speed.py --workdir work          # the demo's model and phantom test set
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

MODES = ("stock", "default", "fast", "fast_seg", "floor")


def run_mode(mode: str, model: Path, images: Path, out: Path, device: str) -> dict:
    """Runs in a child process; returns timing for all cases of the folder."""
    import numpy as np
    import torch

    from nnunet_mtl.inference.predict import PredictionMode, list_cases, load_predictor, predict_folder
    from nnunet_mtl.training.run import resolve_device

    dev = resolve_device(device)
    cases = list_cases(images)
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
        predictor = load_predictor(model, device=dev)
        pm, cm = predictor.plans_manager, predictor.configuration_manager
        network = predictor.network.to(dev).eval()
        stride = np.prod(np.array(cm.pool_op_kernel_sizes), axis=0)
        seconds = 0.0
        for image in cases.values():
            data, _, _ = cm.preprocessor_class(verbose=False).run_case([str(image)], None, pm, cm,
                                                                       predictor.dataset_json)
            shape = np.array(data.shape[1:])
            padded = (np.ceil(shape / stride) * stride).astype(int)
            x = torch.zeros((1, 1, *padded), device=dev)
            with torch.inference_mode():
                start = time.perf_counter()
                network(x)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                seconds += time.perf_counter() - start
    else:
        fast = mode.startswith("fast")
        # fast_seg: the same fast predictor with the head switched off, to price the subtype
        prediction_mode = PredictionMode.fast(classify=mode != "fast_seg") if fast else PredictionMode()
        start = time.perf_counter()
        report = predict_folder(model, images, out, device=dev, mode=prediction_mode, overwrite=True,
                                progress=False)
        seconds = time.perf_counter() - start
        if report.failed:
            raise RuntimeError(report.failed)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "seconds": seconds, "cases": len(cases), "peak_rss_mb": peak_mb}


def score(pred_dir: Path, truth: Path) -> dict:
    import numpy as np
    import SimpleITK as sitk

    from nnunet_mtl.evaluation.metrics import dice

    pancreas, lesion = [], []
    for mask in sorted(truth.glob("*.nii.gz")):
        t = sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))
        p = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / mask.name)))
        pancreas.append(dice(p > 0, t > 0))
        lesion.append(dice(p == 2, t == 2))
    return {"pancreas_dice": float(np.mean(pancreas)), "lesion_dice": float(np.mean(lesion))}


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
    parser.add_argument("--worker", nargs=4, metavar=("MODE", "MODEL", "IMAGES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, model, images, out = args.worker
        print(json.dumps(run_mode(mode, Path(model), Path(images), Path(out), args.device)))
        return

    demo_model = "nnUNet_results/Dataset501_Pancreas/nnUNetTrainerMTL__nnUNetPlans_MTLdemo__3d_fullres"
    model = args.model or args.workdir / demo_model
    images = args.images or args.workdir / "phantom/test"
    truth = args.truth or args.workdir / "phantom/test_groundtruth"
    scratch = Path(tempfile.mkdtemp(prefix="predict_speed_"))
    timings: dict[str, list[float]] = {m: [] for m in args.modes}
    peaks: dict[str, float] = {}
    try:
        for _ in range(args.rounds):
            for mode in args.modes:
                out = scratch / mode
                result = subprocess.run([sys.executable, __file__, "--device", args.device, "--worker", mode,
                                         str(model), str(images), str(out)], capture_output=True, text=True)
                if result.returncode != 0:
                    sys.exit(f"{mode} failed:\n{result.stderr[-3000:]}")
                row = json.loads(result.stdout.strip().splitlines()[-1])
                timings[mode].append(row["seconds"] / row["cases"])
                peaks[mode] = max(peaks.get(mode, 0.0), row["peak_rss_mb"])
        best = {m: min(v) for m, v in timings.items()}
        reference = subtypes(scratch / "default") if "default" in best else {}
        print(f"model {model}\nimages {images} ({len(list(images.glob('*_0000.nii.gz')))} cases), device "
              f"{args.device}, best of {args.rounds} rounds\n")
        print(f"{'mode':<10}{'s/case':>9}{'vs stock':>10}{'vs floor':>10}{'pancreas':>10}{'lesion':>9}"
              f"{'subtype≠default':>17}{'peak MB':>9}")
        for mode, seconds in best.items():
            quality = score(scratch / mode, truth) if mode != "floor" else {}
            changed = ""
            if mode == "fast" and reference:
                mine = subtypes(scratch / mode)
                changed = f"{sum(mine[k] != v for k, v in reference.items()) / len(reference):.0%}"
            ratio_stock = f"{best['stock'] / seconds:.2f}x" if "stock" in best else ""
            ratio_floor = f"{seconds / best['floor']:.2f}" if "floor" in best else ""
            print(f"{mode:<10}{seconds:>9.3f}{ratio_stock:>10}{ratio_floor:>10}"
                  f"{quality.get('pancreas_dice', float('nan')):>10.4f}{quality.get('lesion_dice', float('nan')):>9.4f}"
                  f"{changed:>17}{peaks[mode]:>9.0f}")
        if "fast" in best and "fast_seg" in best:
            print(f"\nsubtype cost in fast mode: {100 * (best['fast'] / best['fast_seg'] - 1):+.1f}% "
                  "of segmentation-only prediction time")
        print("'vs stock': how many times faster than stock; 'vs floor': time / one forward pass over the crop")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
