"""Seconds per training iteration: our multi-task trainer vs stock nnUNetTrainer, same plans, patch and data.

Both trainers get the same batches (taken once from our loader, so data loading and augmentation are out of the
measurement) and alternate in blocks within one run; the stock trainer trains the same U-Net without the head (the
derived plans with the backbone class put back). Prints the median seconds per step and the ratio.

  python bench/train_step.py --workdir work            # the demo's dataset and demo plans (default)
  python bench/train_step.py --workdir W --dataset 501 --plans default --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def stock_plans_from(plans: dict) -> dict:
    """The same U-Net as segmentation-only nnU-Net plans: backbone class back, our keys out."""
    stock = json.loads(json.dumps(plans))
    stock["plans_name"] = plans["plans_name"] + "_stockbench"
    architecture = stock["configurations"]["3d_fullres"]["architecture"]
    kwargs = architecture["arch_kwargs"]
    architecture["network_class_name"] = kwargs.pop("backbone")
    for key in ("num_subtypes", "head", "head_stages", "head_hidden", "head_dropout"):
        kwargs.pop(key, None)
    return stock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("work"))
    parser.add_argument("--dataset", default="501")
    parser.add_argument("--plans", default="demo", help="default | resenc-m | demo | a plans identifier")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=10, help="steps per block (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating blocks per trainer (default 3)")
    args = parser.parse_args()

    os.environ["nnUNet_n_proc_DA"] = "0"  # batches are prepared up front; no worker pools needed
    from nnunet_mtl import paths

    work = paths.configure(args.workdir)
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_mtl.planning.plans import CONFIGURATION, dataset_name, resolve_plans_identifier
    from nnunet_mtl.training.run import build_trainer, resolve_device

    name = dataset_name(args.dataset)
    ours = build_trainer(args.dataset, args.plans, 0, args.device)
    ours.initialize()
    ours.dataloader_train, ours.dataloader_val = ours.get_dataloaders()
    batches = [next(ours.dataloader_train) for _ in range(args.steps)]

    folder = work.preprocessed / name
    plans = json.loads((folder / f"{resolve_plans_identifier(args.plans)}.json").read_text())
    stock_plans = stock_plans_from(plans)
    stock_plans["continue_training"] = False
    dataset_json = json.loads((folder / "dataset.json").read_text())
    stock = nnUNetTrainer(stock_plans, CONFIGURATION, 0, dataset_json, resolve_device(args.device))
    stock.initialize()
    stock.network.train()
    ours.network.train()

    def block(trainer) -> list[float]:
        times = []
        for batch in batches:
            start = time.perf_counter()
            trainer.train_step(batch)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return times

    block(ours), block(stock)  # warm-up (allocator, cuDNN autotuning)
    timing = {"multi-task": [], "stock": []}
    for _ in range(args.rounds):
        timing["multi-task"] += block(ours)
        timing["stock"] += block(stock)
    median = {k: statistics.median(v) for k, v in timing.items()}
    patch = ours.configuration_manager.patch_size
    print(f"plans {plans['plans_name']}, patch {patch}, batch {ours.batch_size}, device {ours.device}, "
          f"{args.rounds} x {args.steps} steps each, alternated")
    for k, v in median.items():
        print(f"{k:<11} {v:.4f} s/iteration (median)")
    print(f"ratio multi-task / stock: {median['multi-task'] / median['stock']:.3f}")


if __name__ == "__main__":
    main()
