"""Does matching a scan's noise to the training scans' help on another scanner? (issue 12 and 17, an experiment)

Site B's sharp kernel gives finer, stronger noise than site A's (phantom ``Site.noise_grain`` / ``noise_scale``).
This measures each image's high-frequency noise (Immerkaer's Laplacian-difference estimate, robust: the median
absolute response over soft-tissue voxels, in HU), takes the training site's training and validation images as the
reference, and smooths in-plane only the test images whose noise lies above the reference's 95th percentile, with
the Gaussian sigma (voxels, found by bisection) that brings them to the reference median. It then predicts the
smoothed test set with the trained model and compares, on the same cases, against the model's predictions on the
original images: ``bench/arms.py`` with the two as arms (subtype macro-F1 and ECE, lesion sensitivity, false lesions
and lesion Dice, each with its paired bootstrap interval). Every test image is predicted again, smoothed or not.

  python bench/noise_harmonisation.py --workdir /work/bench_cls --run A_long --sites B A

needs the bench's phantoms, model and predictions (``bench/classification.py ... --ablation long``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

LAPLACE_DIFFERENCE = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)  # Immerkaer 1996


def noise_hu(hu: np.ndarray) -> float:
    """High-frequency noise SD in HU: median |response| of the in-plane Laplacian difference over soft tissue
    (-100..250 HU, eroded in-plane so edges count little), scaled for a Gaussian (0.6745) and the kernel's norm (6)."""
    from scipy import ndimage

    response = ndimage.convolve(hu, LAPLACE_DIFFERENCE[None], mode="nearest")
    soft = ndimage.binary_erosion((hu > -100) & (hu < 250), np.ones((1, 3, 3), bool))
    if soft.sum() < 100:
        return float("nan")
    return float(np.median(np.abs(response[soft])) / 0.6745 / 6.0)


def smoothed(hu: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(hu, (0, sigma, sigma)) if sigma > 0 else hu


def sigma_for(hu: np.ndarray, target: float, top: float = 2.0, steps: int = 12) -> float:
    """The in-plane sigma (voxels) whose smoothing brings the image's noise estimate down to ``target``."""
    low, high = 0.0, top
    for _ in range(steps):
        mid = (low + high) / 2
        if noise_hu(smoothed(hu, mid)) > target:
            low = mid
        else:
            high = mid
    return round((low + high) / 2, 3)


def read_hu(path: Path):
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image).astype(np.float32)


def reference(phantom: Path) -> dict:
    """Noise of the training site's training and validation images: median and 95th percentile."""
    images = sorted(p for split in ("train", "validation") for p in (phantom / split).glob("subtype*/*_0000.nii.gz"))
    values = [noise_hu(read_hu(p)[1]) for p in images]
    return {"n": len(values), "median": float(np.nanmedian(values)), "p95": float(np.nanpercentile(values, 95))}


def harmonise_site(phantom: Path, out: Path, ref: dict) -> dict:
    """A copy of ``phantom``'s test set with the noisy images smoothed (the rest linked); facts per case."""
    import SimpleITK as sitk

    (out / "test").mkdir(parents=True, exist_ok=True)
    for name in ("phantom.json", "test_groundtruth"):
        if not (out / name).exists():
            (out / name).symlink_to(phantom / name)
    facts_path = out / "harmonisation.json"
    if facts_path.is_file():
        return json.loads(facts_path.read_text())
    facts = {}
    for path in sorted((phantom / "test").glob("*_0000.nii.gz")):
        image, hu = read_hu(path)
        before = noise_hu(hu)
        sigma = sigma_for(hu, ref["median"]) if before > ref["p95"] else 0.0
        target = out / "test" / path.name
        after = smoothed(hu, sigma)
        if sigma > 0:
            result = sitk.GetImageFromArray(np.rint(after).astype(np.int16))
            result.CopyInformation(image)
            sitk.WriteImage(result, str(target), useCompression=True)
        elif not target.exists():
            target.symlink_to(path)
        facts[path.name] = {"noise_before": round(before, 2), "sigma": sigma, "noise_after": round(noise_hu(after), 2)}
    facts_path.write_text(json.dumps({"reference": ref, "cases": facts}, indent=1))
    return {"reference": ref, "cases": facts}


def main() -> None:
    from classification import predict_site

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--run", required=True, help="training tag as in preds_<run>_on_<site> (e.g. A_long)")
    parser.add_argument("--model", type=Path, help="model folder (default: found under the workdir)")
    parser.add_argument("--train-site", default=None, help="default: the run's first letter")
    parser.add_argument("--sites", nargs="+", default=["B"])
    parser.add_argument("--variant", default="cnn")
    args = parser.parse_args()
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    work = args.workdir.resolve()
    train_site = args.train_site or args.run[0]
    suffix = args.run[len(train_site):]
    model = args.model or next(work.glob(f"nnunet/nnUNet_results/*Site{train_site}/"
                                         f"nnUNetTrainerMTL__*{suffix}__3d_fullres"))
    ref_path = work / f"noise_reference_{train_site}.json"
    if not ref_path.is_file():
        ref_path.write_text(json.dumps(reference(work / f"phantom_{train_site}")))
    ref = json.loads(ref_path.read_text())
    print(f"reference noise (site {train_site}, {ref['n']} images): median {ref['median']:.2f} HU, "
          f"95th percentile {ref['p95']:.2f} HU", flush=True)
    for site in args.sites:
        phantom = work / f"phantom_{site}"
        folder = work / f"phantom_{site}_harmonised_to_{train_site}"
        started = time.perf_counter()
        facts = harmonise_site(phantom, folder, ref)["cases"]
        sigmas = np.array([f["sigma"] for f in facts.values()])
        before = np.array([f["noise_before"] for f in facts.values()])
        print(f"site {site}: noise median {np.median(before):.2f} HU; {int((sigmas > 0).sum())}/{len(sigmas)} "
              f"images smoothed (sigma median {np.median(sigmas[sigmas > 0]) if (sigmas > 0).any() else 0:.2f} "
              f"voxels) in {time.perf_counter() - started:.0f} s", flush=True)
        predict_site(model, folder, work / f"preds_{args.run}_harmonised_on_{site}")
        if (phantom / "test_groundtruth").is_dir():  # the same cases, original against harmonised, lesions too
            subprocess.run([sys.executable, str(Path(__file__).parent / "arms.py"), "--workdir", str(work),
                            "--arm", "original", args.run, "--arm", "harmonised", f"{args.run}_harmonised",
                            "--sites", site, "--variant", args.variant], check=True)


if __name__ == "__main__":
    sys.exit(main())
