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
    small_lesion_oversampling: float | None = None
    oversample_foreground_percent: float | None = None
    case_validation_every: int | None = None
    final_validation_fast: bool | None = None
    save_every: int | None = None
    subtype_loss_on_lesion_patches_only: bool | None = None
    attend_to_true_lesion: bool | None = None
    imperfect_attention: float | None = None
    cpu_bf16: bool | None = None
    optimizer: str | None = None
    mirror_augmentation: bool | None = None
    intensity_augmentation: str | None = None
    thick_slice_mm: float | None = None
    lesion_contrast_augmentation: bool | None = None
    max_rotation_degrees: float | None = None
    feature_model_kind: str | None = None
    shift_calibration: bool | None = None
    feature_set: str | None = None
    head_lr_scale: float | None = None
    lesion_loss_weight: float | None = None
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
          validate: bool = True, subtype_fit: str = "fold", validation_only: bool = False) -> dict:
    """Train one fold (resuming if asked), then predict and score its validation cases (fitting the subtype
    classifier on the way, unless ``subtype_fit`` is "none").

    ``validation_only`` (nnU-Net's ``--val``): no training; the fold's final checkpoint predicts the validation
    cases again and the postprocessing (largest component, false-lesion filters) is decided anew, e.g. for a model
    trained before the lesion filters existed. Returns paths and the final validation metrics.
    """
    if resume and initial_weights:
        raise ValueError("--resume continues a run; --initial-weights starts one. Use one of them.")
    trainer = build_trainer(dataset, plans, fold, device, continue_training=resume)
    apply_settings(trainer, settings or TrainSettings())
    trainer.subtype_fit = subtype_fit
    trainer.initialize()
    remove_stale(Path(trainer.output_folder))  # a checkpoint being written when a run was killed
    if validation_only:
        final = Path(trainer.output_folder) / "checkpoint_final.pth"
        if not final.is_file():
            raise FileNotFoundError(f"{final} not found: train the fold first")
        trainer.load_weights_for_validation(final)
        return {"output_folder": trainer.output_folder, "model_folder": trainer.output_folder_base,
                "metrics": trainer.perform_actual_validation()}
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


def train_folds(dataset: str | int, plans: str = "default", folds: list[str] | tuple[str, ...] = ("0",),
                device: str = "auto", settings: TrainSettings | None = None, resume: bool = False,
                initial_weights: str | None = None, validate: bool = True, validation_only: bool = False) -> dict:
    """Train each fold in turn (a fold whose final checkpoint exists is kept when resuming); with several folds the
    subtype classifier is fitted once at the end on their out-of-fold predictions, and the postprocessing (largest
    component, lesion filters) is decided again on all their validation cases together.

    Returns the model folder, each fold's result and the classifier's provenance.
    """
    from nnunet_mtl.training.fold_decisions import decide_from_folds
    from nnunet_mtl.training.subtype_fit import fit_from_model_folder

    results, model_folder = {}, None
    several = len(folds) > 1
    for fold in folds:
        trainer_folder = Path(build_trainer(dataset, plans, fold, device).output_folder)
        if resume and several and not validation_only and (trainer_folder / "checkpoint_final.pth").is_file() \
                and (trainer_folder / "validation" / "metrics.json").is_file():
            print(f"fold {fold}: finished earlier, kept")
            model_folder = trainer_folder.parent
            continue
        results[fold] = train(dataset, plans, fold, device, settings, resume, initial_weights, validate,
                              subtype_fit="none" if several else "fold", validation_only=validation_only)
        model_folder = Path(results[fold]["model_folder"])
    classifier = None
    if several and validate and model_folder is not None:
        names = build_trainer(dataset, plans, folds[0], device).subtype_names
        kind = (settings.feature_model_kind if settings else None) or "lda"
        feature_set = (settings.feature_set if settings else None) or "all"
        fitted = fit_from_model_folder(model_folder, names, [str(f) for f in folds], kind, feature_set)
        fitted.save(model_folder)
        classifier = fitted.provenance
        print(f"subtype classifier fitted: {fitted.provenance}")
    decisions = None
    if several and validate and model_folder is not None:
        decisions = decide_from_folds(model_folder, [str(f) for f in folds])
        if decisions is None:
            print("postprocessing: a fold's validation predates the stored evidence, so the last fold's decision "
                  "stands; `train --fold ... --validation-only` decides it on every fold's cases")
        else:
            filters = decisions["lesion_filters"]
            print(f"postprocessing over folds {', '.join(map(str, folds))} "
                  f"({decisions['postprocessing']['cases']} validation cases): keep largest component "
                  f"{decisions['postprocessing']['keep_largest_component']}; lesion filters "
                  f"{filters['description'] if filters else 'none (no lesion evidence)'}")
    return {"model_folder": model_folder, "folds": results, "classifier": classifier, "postprocessing": decisions}
