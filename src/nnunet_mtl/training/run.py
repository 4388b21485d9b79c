"""Build the multi-task trainer from the plans and run it (nnU-Net's run_training flow, without the name lookup)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nnunet_mtl import paths
from nnunet_mtl.planning.plans import CONFIGURATION, dataset_name, resolve_plans_identifier
from nnunet_mtl.tempfiles import remove_stale

CHECKPOINT_ORDER = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


@dataclass
class TrainSettings:
    """What `nnunet-mtl train` can change; None keeps nnU-Net's (or the trainer's) default."""

    epochs: int | None = None
    iterations: int | None = None
    val_iterations: int | None = None
    initial_lr: float | None = None
    classification_loss_weight: float | None = None
    class_weighting: str | None = None
    label_smoothing: float | None = None
    lesion_centred_sampling: bool | None = None
    class_balanced_sampling: bool | None = None
    oversample_foreground_percent: float | None = None
    case_validation_every: int | None = None
    final_validation_fast: bool | None = None
    save_every: int | None = None
    subtype_loss_on_lesion_patches_only: bool | None = None
    attend_to_true_lesion: bool | None = None
    cpu_bf16: bool | None = None
    optimizer: str | None = None
    mirror_augmentation: bool | None = None
    max_rotation_degrees: float | None = None
    frozen_parts: tuple[str, ...] = field(default_factory=tuple)


SETTING_TO_ATTRIBUTE = {"epochs": "num_epochs", "iterations": "num_iterations_per_epoch",
                        "val_iterations": "num_val_iterations_per_epoch", "optimizer": "optimizer_name"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    if name == "cpu":
        # nnU-Net's entry point does the same: use every core for the network on CPU
        torch.set_num_threads(os.cpu_count() or 1)
    return torch.device(name)


def build_trainer(dataset: str | int, plans: str = "default", fold: int | str = 0, device: str = "auto",
                  continue_training: bool = False):
    from nnunet_mtl.training.trainer import nnUNetTrainerMTL

    name = dataset_name(dataset)
    folder = paths.current().preprocessed / name
    plans_identifier = resolve_plans_identifier(plans)
    plans_file = folder / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file} not found: run `nnunet-mtl plan {name}` first "
                                f"(with --preset demo for the demo plans, --planner resenc-m for ResEnc M)")
    plans_dict = json.loads(plans_file.read_text())
    plans_dict["continue_training"] = continue_training
    dataset_json = json.loads((folder / "dataset.json").read_text())
    fold = fold if fold == "all" else int(fold)
    return nnUNetTrainerMTL(plans_dict, CONFIGURATION, fold, dataset_json, resolve_device(device))


def apply_settings(trainer, settings: TrainSettings) -> None:
    from nnunet_mtl.training.optim import ADAMW_DEFAULT_LR

    if settings.optimizer == "adamw" and settings.initial_lr is None:
        trainer.initial_lr = ADAMW_DEFAULT_LR  # nnU-Net's 0.01 is an SGD rate
    for key, value in vars(settings).items():
        if value is None or (key == "frozen_parts" and not value):
            continue
        setattr(trainer, SETTING_TO_ATTRIBUTE.get(key, key), tuple(value) if key == "frozen_parts" else value)


def find_resume_checkpoint(output_folder: str | Path) -> Path | None:
    for name in CHECKPOINT_ORDER:
        candidate = Path(output_folder) / name
        if candidate.is_file():
            return candidate
    return None


def train(dataset: str | int, plans: str = "default", fold: int | str = 0, device: str = "auto",
          settings: TrainSettings | None = None, resume: bool = False, initial_weights: str | None = None,
          validate: bool = True) -> dict:
    """Train one fold (resuming if asked), then predict and score its validation cases.

    Returns paths and the final validation metrics.
    """
    if resume and initial_weights:
        raise ValueError("--resume continues a run; --initial-weights starts one. Use one of them.")
    trainer = build_trainer(dataset, plans, fold, device, continue_training=resume)
    apply_settings(trainer, settings or TrainSettings())
    trainer.initialize()
    remove_stale(Path(trainer.output_folder))  # a checkpoint being written when a run was killed
    checkpoint = find_resume_checkpoint(trainer.output_folder) if resume else None
    if checkpoint is not None:
        trainer.load_checkpoint(str(checkpoint))
        print(f"resuming from {checkpoint} at epoch {trainer.current_epoch}")
    elif resume:
        print(f"nothing to resume in {trainer.output_folder}; starting a new run")
    elif initial_weights:
        trainer.load_initial_weights(initial_weights)
    trainer.run_training()
    metrics = trainer.perform_actual_validation() if validate else None
    return {"output_folder": trainer.output_folder, "model_folder": trainer.output_folder_base, "metrics": metrics}
