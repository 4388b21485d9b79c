"""Where a fast-mode case's time goes, step by step, for each resampler; and how far the two resamplers' masks differ.

Steps are timed by wrapping nnU-Net's functions in this process only (nothing is changed for anyone else):
  read         SimpleITKIO.read_images
  crop         crop_to_nonzero
  normalise    the preprocessor's _normalize (CT clip + z-score)
  resample     the rest of the preprocessor's run_case: resampling the image (and the nonzero mask nnU-Net makes
               from it) to the planned spacing
  network      forward passes over the crop (single pass or tiles)
  lesion tile  the subtype pass: lesion_centre (connected components) + one patch forward
  resample back  the export's resampling of the logits to the original grid
  argmax, uncrop, largest component, write   the rest of the export
  other        the case's wall time minus all of the above
Wall time and CPU time (all threads of the process) per step: on a loaded machine the CPU time of the single-threaded
steps stays close to what they take alone.

Run it through `bench/real_scale.py --stages profile`, or alone:
  python bench/profile_fast.py --model MODEL --images IMAGES [--out DIR] [--resamplers plans torch]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import defaultdict
from pathlib import Path

STEPS = ("read", "crop", "normalise", "resample", "network", "lesion tile", "resample back", "argmax", "uncrop",
         "largest component", "write", "other")


class StepTimer:
    """Accumulates seconds per step while installed; wrappers are removed on exit."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)  # wall time
        self.cpu_seconds: dict[str, float] = defaultdict(float)  # CPU time of the process (all its threads)
        self._patches: list[tuple[object, str, object]] = []

    def add(self, step: str, wall: float, cpu: float) -> None:
        self.seconds[step] += wall
        self.cpu_seconds[step] += cpu

    def wrap(self, owner, name: str, step: str, exclusive_of: tuple[str, ...] = ()) -> None:
        """Time ``owner.name`` as ``step``; the time of ``exclusive_of`` steps inside it is not counted twice."""
        original = getattr(owner, name)
        timer = self

        def timed(*args, **kwargs):
            inner_before = sum(timer.seconds[s] for s in exclusive_of), sum(timer.cpu_seconds[s] for s in exclusive_of)
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                inner = (sum(timer.seconds[s] for s in exclusive_of) - inner_before[0],
                         sum(timer.cpu_seconds[s] for s in exclusive_of) - inner_before[1])
                timer.add(step, time.perf_counter() - start - inner[0], time.process_time() - cpu - inner[1])

        self._patches.append((owner, name, original))
        setattr(owner, name, timed)

    def remove(self) -> None:
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches.clear()


@contextlib.contextmanager
def step_timer(predictor_network):
    import nnunetv2.inference.export_prediction as export
    import nnunetv2.preprocessing.preprocessors.default_preprocessor as preprocessing
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    import nnunet_mtl.inference.predict as predict_module
    from nnunet_mtl.inference.predictor import MultiTaskPredictor

    timer = StepTimer()
    timer.wrap(SimpleITKIO, "read_images", "read")
    timer.wrap(SimpleITKIO, "write_seg", "write")
    timer.wrap(preprocessing, "crop_to_nonzero", "crop")
    timer.wrap(preprocessing.DefaultPreprocessor, "_normalize", "normalise")
    timer.wrap(preprocessing.DefaultPreprocessor, "run_case", "resample", exclusive_of=("read", "crop", "normalise"))
    timer.wrap(MultiTaskPredictor, "_classify_on_lesion_tile", "lesion tile")
    timer.wrap(LabelManager, "convert_logits_to_segmentation", "argmax")
    timer.wrap(export, "insert_crop_into_image", "uncrop")
    timer.wrap(export, "convert_predicted_logits_to_segmentation_with_correct_shape", "resample back",
               exclusive_of=("argmax", "uncrop"))
    timer.wrap(predict_module, "keep_largest_component", "largest component")

    def pre(*_):
        timer._forward_start = time.perf_counter(), time.process_time()

    def post(*_):
        # forward passes inside the lesion tile are the lesion tile's; the wrapper above already counts them
        if not any(f.f_code.co_name == "_classify_on_lesion_tile" for f in _frames()):
            timer.add("network", time.perf_counter() - timer._forward_start[0],
                      time.process_time() - timer._forward_start[1])

    handles = [predictor_network.register_forward_pre_hook(pre), predictor_network.register_forward_hook(post)]
    try:
        yield timer
    finally:
        for h in handles:
            h.remove()
        timer.remove()


def _frames():
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        yield frame
        frame = frame.f_back


def dice(a, b) -> float:
    import numpy as np

    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def compare_masks(first: Path, second: Path, cases: list[str], nested: bool = False) -> dict[str, float]:
    """Mean Dice of the masks of two runs against each other (whole pancreas, lesion) and the voxels that differ.
    ``nested``: the masks lie in subfolders (the benchmark's chunks)."""
    import numpy as np
    import SimpleITK as sitk

    def find(folder: Path, case: str) -> Path:
        return next(folder.glob(f"*/{case}.nii.gz")) if nested else folder / f"{case}.nii.gz"

    pancreas, lesion, differ = [], [], []
    for case in cases:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(find(first, case))))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(find(second, case))))
        pancreas.append(dice(a > 0, b > 0))
        lesion.append(dice(a == 2, b == 2))
        differ.append(float((a != b).mean()))
    return {"pancreas_dice": float(np.mean(pancreas)), "lesion_dice": float(np.mean(lesion)),
            "min_pancreas_dice": float(np.min(pancreas)), "min_lesion_dice": float(np.min(lesion)),
            "voxels_differing": float(np.mean(differ))}


def compare_resamplers_on_truth(model: Path, images: Path, truth: Path, device: str) -> dict:
    """Both resamplers on the truth instead of a network's output, so the comparison needs no trained model.

    Input side: each test image preprocessed with the plans' resampler and with the torch one (correlation and mean
    absolute difference of the normalised images). Export side: the truth mask brought to the network's grid
    (nearest neighbour), turned into smooth one-hot logits (Gaussian, sigma 1 voxel: boundaries as soft as a
    network's) and exported back to the image grid by either resampler, as nnU-Net's export does with logits.
    """
    import numpy as np
    import SimpleITK as sitk
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from scipy import ndimage

    from nnunet_mtl.inference.predict import list_cases, load_predictor
    from nnunet_mtl.inference.resampling import prediction_configuration
    from nnunet_mtl.training.run import resolve_device

    dev = resolve_device(device)
    predictor = load_predictor(model, device=dev)
    pm, planned = predictor.plans_manager, predictor.configuration_manager
    managers = {"plans": planned, "torch": prediction_configuration(planned, "torch", dev)}
    rows = []
    for case, image in list_cases(images).items():
        prepared = {}
        for name, cm in managers.items():
            prepared[name] = cm.preprocessor_class(verbose=False).run_case([str(image)], None, pm, cm,
                                                                           predictor.dataset_json)
        (a, _, properties), (b, _, _) = prepared["plans"], prepared["torch"]
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(truth / f"{case}.nii.gz")))
        cropped = mask.transpose(pm.transpose_forward)[tuple(slice(lo, hi) for lo, hi in
                                                             properties["bbox_used_for_cropping"])]
        on_grid = ndimage.zoom(cropped, [n / o for n, o in zip(a.shape[1:], cropped.shape)], order=0)
        logits = torch.from_numpy(np.stack([ndimage.gaussian_filter((on_grid == k).astype(np.float32), 1.0)
                                            for k in range(3)]))
        exported = {name: convert_predicted_logits_to_segmentation_with_correct_shape(
            logits.clone(), pm, cm, predictor.label_manager, dict(properties)) for name, cm in managers.items()}
        p, t = exported["plans"], exported["torch"]
        rows.append({"image_correlation": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
                     "image_mean_abs_difference": float(np.abs(a - b).mean()),
                     "pancreas_dice": dice(p > 0, t > 0), "lesion_dice": dice(p == 2, t == 2),
                     "plans_vs_truth_pancreas": dice(p > 0, mask > 0),
                     "torch_vs_truth_pancreas": dice(t > 0, mask > 0),
                     "plans_vs_truth_lesion": dice(p == 2, mask == 2),
                     "torch_vs_truth_lesion": dice(t == 2, mask == 2)})
    summary = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    return {**summary, "min_pancreas_dice": min(r["pancreas_dice"] for r in rows),
            "min_lesion_dice": min(r["lesion_dice"] for r in rows), "cases": len(rows)}


def profile_fast_mode(model: Path, images: Path, out_root: Path, device: str,
                      resamplers: list[str] = ("plans", "torch"), truth_dir: Path | None = None) -> dict:
    """Fast mode over every case of ``images`` once per resampler, each step timed; the resamplers' masks and
    subtypes compared with each other."""
    from nnunet_mtl.inference import predict as predict_module
    from nnunet_mtl.inference.predict import PredictionMode, list_cases, load_predictor, predict_folder
    from nnunet_mtl.training.run import resolve_device

    dev = resolve_device(device)
    cases = list_cases(images)
    warmup_images = out_root / "warmup_images"  # one case, untimed: lazy imports, allocator, first-call costs
    warmup_images.mkdir(parents=True, exist_ok=True)
    first = next(iter(cases.values()))
    if not (warmup_images / first.name).exists():
        (warmup_images / first.name).symlink_to(first.resolve())
    results = {}
    original_load = predict_module.load_predictor
    try:
        for resampler in resamplers:
            mode = PredictionMode.fast(resampler=resampler)
            predictor = load_predictor(model, device=dev, mode=mode)
            predict_module.load_predictor = lambda *args, p=predictor, **kwargs: p  # predict_folder reuses it
            predict_folder(model, warmup_images, out_root / f"warmup_{resampler}", device=dev, mode=mode,
                           overwrite=True, progress=False)
            with step_timer(predictor.network) as timer:
                report = predict_folder(model, images, out_root / resampler, device=dev, mode=mode, overwrite=True,
                                        progress=False)
            if report.failed:
                raise RuntimeError(report.failed)
            total = sum(report.seconds_per_case.values())
            steps, cpu = dict(timer.seconds), dict(timer.cpu_seconds)
            steps["other"] = total - sum(steps.values())
            results[resampler] = {"seconds_per_case": total / len(cases),
                                  "steps_per_case": {k: steps.get(k, 0.0) / len(cases) for k in STEPS},
                                  "cpu_seconds_per_case": {k: cpu.get(k, 0.0) / len(cases) for k in STEPS[:-1]},
                                  "case_seconds": report.seconds_per_case}
    finally:
        predict_module.load_predictor = original_load
    if "plans" in results and "torch" in results:
        from predict_speed import subtypes

        results["torch_vs_plans_masks"] = compare_masks(out_root / "plans", out_root / "torch", sorted(cases))
        a, b = subtypes(out_root / "plans"), subtypes(out_root / "torch")
        results["subtype_agreement"] = sum(a[k] == b.get(k) for k in a) / max(len(a), 1)
    results["cases"] = len(cases)
    truth = images.resolve().parents[1] / "phantom" / "test_groundtruth"  # the rehearsal's layout
    if truth_dir is not None or truth.is_dir():
        results["resamplers_on_truth"] = compare_resamplers_on_truth(model, images, truth_dir or truth, device)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("/tmp/profile_fast"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resamplers", nargs="+", default=["plans", "torch"], choices=["plans", "torch"])
    parser.add_argument("--truth", type=Path, help="truth masks: compare both resamplers on them too")
    parser.add_argument("--truth-only", action="store_true", help="only the comparison on the truth (no model run)")
    args = parser.parse_args()
    if args.truth_only:
        print(json.dumps(compare_resamplers_on_truth(args.model, args.images, args.truth, args.device), indent=1))
        return
    print(json.dumps(profile_fast_mode(args.model, args.images, args.out, args.device, args.resamplers, args.truth),
                     indent=1))


if __name__ == "__main__":
    main()
