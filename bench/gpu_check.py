"""One prepared check of the CUDA path, for a lent GPU machine (see bench/gpu_check.sh).

On phantom data at the real crop size (`full` preset): plan with nnU-Net's default planner, train the multi-task
network for a few iterations with AMP (and torch.compile when it works), check channels-last, then time
prediction: stock nnU-Net (step 0.5, mirroring) vs ours default vs ours fast, plus the train-step ratio against
stock nnUNetTrainer. Weights come from a few iterations only: the Dice printed here says nothing about accuracy,
the timings are what this is for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def main() -> None:
    out = Path(os.environ.get("OUT", "/tmp/gpu_check"))
    work = Path("/tmp/gpu_work")
    os.environ.setdefault("nnUNet_def_n_proc", "8")
    os.environ.setdefault("nnUNet_n_proc_DA", "8")
    from nnunet_mtl import paths

    paths.configure(work)
    import torch

    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device {torch.cuda.get_device_name()}")
    from nnunet_mtl.data.importer import import_dataset, scan_published
    from nnunet_mtl.data.phantom import generate_phantom_dataset
    from nnunet_mtl.planning.plans import plan_and_preprocess
    from nnunet_mtl.training.run import TrainSettings, train

    t = step("phantom (full preset: real crop size and spacing) + import + plan")
    phantom = work / "phantom"
    if not phantom.exists():
        generate_phantom_dataset(phantom, "full", seed=1, train_per_subtype=(3, 3, 3), val_per_subtype=(1, 1, 1),
                                 n_test=6, progress=False)
        import_dataset(scan_published(phantom), paths.current().raw, 601, "PancreasFull", progress=False)
        plan_and_preprocess(601, "default")
    plans = json.loads((paths.current().preprocessed / "Dataset601_PancreasFull" / "nnUNetPlans_MTL.json")
                       .read_text())
    config = plans["configurations"]["3d_fullres"]
    print(f"planned patch {config['patch_size']}, batch {config['batch_size']}, spacing {config['spacing']}, "
          f"features {config['architecture']['arch_kwargs']['features_per_stage']} ({time.perf_counter() - t:.0f} s)")

    results = {}
    for compile_flag in ("false", "true"):
        os.environ["nnUNet_compile"] = compile_flag
        t = step(f"train 2 epochs x 10 iterations, AMP, torch.compile={compile_flag}")
        try:
            settings = TrainSettings(epochs=2, iterations=10, val_iterations=2, final_validation_fast=True)
            result = train(601, "default", 0, "cuda", settings, validate=False)
            seconds = time.perf_counter() - t
            curves = json.loads((Path(result["output_folder"]) / "training_curves.json").read_text())
            epoch_times = [e - s for s, e in zip(curves["epoch_start_timestamps"], curves["epoch_end_timestamps"])]
            results[f"train_compile_{compile_flag}"] = {"seconds": seconds, "epoch_seconds": epoch_times}
            print(f"ok: {seconds:.0f} s, epoch times {[round(e, 1) for e in epoch_times]}")
        except Exception as e:  # report and go on: the other checks still tell something
            results[f"train_compile_{compile_flag}"] = {"error": repr(e)[:500]}
            print(f"FAILED: {e!r}")
    os.environ["nnUNet_compile"] = "false"

    t = step("channels-last forward check")
    from nnunet_mtl.inference.predict import PredictionMode, load_predictor

    model = paths.current().results / "Dataset601_PancreasFull" / "nnUNetTrainerMTL__nnUNetPlans_MTL__3d_fullres"
    predictor = load_predictor(model, device=torch.device("cuda"), mode=PredictionMode(channels_last=True))
    x = torch.randn(1, 1, *config["patch_size"], device="cuda")
    net = predictor.network.cuda().eval()
    with torch.inference_mode(), torch.autocast("cuda"):
        seg_cl, cls_cl = net(x.contiguous(memory_format=torch.channels_last_3d))
        net_plain = load_predictor(model, device=torch.device("cuda")).network.cuda().eval()
        seg, cls = net_plain(x)
        for name, module in (("channels_last", net), ("contiguous", net_plain)):
            inp = x.contiguous(memory_format=torch.channels_last_3d) if name == "channels_last" else x
            for _ in range(3):
                module(inp)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                module(inp)
            torch.cuda.synchronize()
            results[f"forward_{name}_ms"] = (time.perf_counter() - start) / 10 * 1000
    diff = (seg_cl.float() - seg.float()).abs().max().item()
    results["channels_last_max_abs_diff"] = diff
    print(f"max |seg(channels_last) - seg| = {diff:.4f}; forward ms: contiguous "
          f"{results['forward_contiguous_ms']:.1f}, channels_last {results['forward_channels_last_ms']:.1f}")

    t = step("prediction speed: stock vs ours default vs ours fast (bench/predict_speed.py)")
    speed = subprocess.run([sys.executable, str(REPO / "bench/predict_speed.py"), "--model", str(model),
                            "--images", str(phantom / "test"), "--truth", str(phantom / "test_groundtruth"),
                            "--device", "cuda", "--rounds", "1"], capture_output=True, text=True)
    print(speed.stdout[-4000:], speed.stderr[-2000:])
    results["predict_speed"] = speed.stdout

    t = step("train step: multi-task vs stock nnUNetTrainer (bench/train_step.py)")
    ratio = subprocess.run([sys.executable, str(REPO / "bench/train_step.py"), "--workdir", str(work),
                            "--dataset", "601", "--plans", "default", "--device", "cuda", "--steps", "10",
                            "--rounds", "3"], capture_output=True, text=True)
    print(ratio.stdout[-2000:], ratio.stderr[-1500:])
    results["train_step"] = ratio.stdout
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
