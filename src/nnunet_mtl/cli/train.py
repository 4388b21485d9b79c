"""``nnunet-mtl train``: one network for segmentation and subtype, nnU-Net's trainer underneath."""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_mtl.cli import CliError, add_workdir_argument

EPILOG = """\
outputs (nnU-Net's layout, so nnU-Net's tools understand the folder):
  nnUNet_results/Dataset<NNN>_<name>/nnUNetTrainerMTL__<plans>__3d_fullres/
    plans.json, dataset.json
    fold_<k>/checkpoint_{latest,best,final}.pth   latest every epoch (atomic); best by the combined score
    fold_<k>/progress.png                         nnU-Net's curves
    fold_<k>/progress_classification.png          loss parts, case-level Dice, accuracy, macro-F1
    fold_<k>/training_curves.json                 every logged value per epoch
    fold_<k>/validation/                          masks, subtype_results.csv, metrics.json of the fold

best checkpoint: highest EMA of 0.5 x (whole-pancreas Dice + lesion Dice) / 2 + 0.5 x macro-F1, all measured
per validation case every --case-validation-every epochs.

examples:
  nnunet-mtl train 501 --plans demo --epochs 12 --iterations 50 --device cpu
  nnunet-mtl train 501 --plans resenc-m --device cuda                 # the report's protocol: 1000 x 250
  nnunet-mtl train 501 --plans demo --resume                          # continue after an interruption
  nnunet-mtl train 501 --initial-weights seg_only_nnunet.pth --freeze encoder --epochs 50
multi-GPU: use nnU-Net's DDP path, e.g. `nnUNet_extTrainer=$(nnunet-mtl ext-trainer-path) nnUNetv2_train 501
  3d_fullres 0 -tr nnUNetTrainerMTL -p nnUNetPlans_MTL -num_gpus 2` (see README).
"""


def _bool(value: str) -> bool:
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected yes/no, got {value!r}")


def _millimetres(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (off) or a thickness in mm, got {value!r}")
    return number


def _share(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"expected a share from 0 to 1, got {value!r}")
    return number


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train the multi-task network on one fold (resumable)",
                                   description=__doc__, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="dataset id or name")
    parser.add_argument("--fold", nargs="+", default=["0"], metavar="FOLD",
                        help="fold(s) (0 = published train/validation split; 1-5 cross-validation; all). Several "
                             "folds train in turn and the subtype classifier is fitted on their out-of-fold "
                             "predictions, e.g. --fold 1 2 3 4 5")
    parser.add_argument("--plans", default="default",
                        help="default | resenc-m | demo, or a plans identifier (default: default)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--epochs", type=int, help="epochs (nnU-Net: 1000)")
    parser.add_argument("--iterations", type=int, help="training iterations per epoch (nnU-Net: 250)")
    parser.add_argument("--val-iterations", type=int, help="validation patches per epoch (nnU-Net: 50)")
    parser.add_argument("--lr", type=float, dest="initial_lr",
                        help="initial learning rate (nnU-Net's SGD: 0.01; AdamW: 0.002)")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"],
                        help="sgd: nnU-Net's (default, for the 1000-epoch protocol); adamw: converges much faster "
                             "in short runs such as the CPU demo")
    parser.add_argument("--mirror", type=_bool, dest="mirror_augmentation", metavar="yes|no",
                        help="mirroring augmentation (default yes, as nnU-Net; no also turns off test-time "
                             "mirroring, since CT comes in one orientation)")
    parser.add_argument("--intensity-aug", choices=["nnunet", "scanner"], dest="intensity_augmentation",
                        help="intensity augmentation: nnunet (nnU-Net's, default) or scanner (adds contrast-timing, "
                             "HU-calibration and kernel-noise shifts, for data from other scanners)")
    parser.add_argument("--thick-slices", type=_millimetres, dest="thick_slice_mm", metavar="MM",
                        help="thick-slice augmentation: half the training patches look as if reconstructed at up to "
                             "MM mm along z (partial volume), for test scans with thicker slices than the training "
                             "data (default 0: off; no gain measured on the phantom sites)")
    parser.add_argument("--lesion-contrast-aug", type=_bool, dest="lesion_contrast_augmentation", metavar="yes|no",
                        help="lesion contrast augmentation: in half the training patches the lesion's mean contrast "
                             "with the gland around it is scaled by 0.35-1.1 (texture kept), for lesions dimmer or "
                             "brighter than the training data's; those patches do not train the subtype head "
                             "(default no: on the phantom sites it found more "
                             "faint lesions but added about 0.3 false lesions per case)")
    parser.add_argument("--max-rotation", type=float, dest="max_rotation_degrees", metavar="DEG",
                        help="rotation augmentation range in degrees (default: nnU-Net's, 30 in 3D)")
    parser.add_argument("--lesion-loss-weight", type=float, metavar="W",
                        help="weight of lesion voxels in the segmentation cross-entropy (default 1, as nnU-Net)")
    parser.add_argument("--resume", action="store_true", help="continue from the fold's last checkpoint")
    parser.add_argument("--initial-weights", help="start from a checkpoint: ours or a segmentation-only nnU-Net "
                                                  "one (the head then starts fresh)")
    parser.add_argument("--freeze", nargs="+", choices=["encoder", "decoder", "head"], default=[],
                        help="parts whose weights do not change (fine-tune one task)")
    group = parser.add_argument_group("classification")
    group.add_argument("--cls-weight", type=float, dest="classification_loss_weight",
                       help="weight of the subtype loss (default 0.3)")
    group.add_argument("--class-weighting", choices=["inverse_frequency", "none"],
                       help="subtype CE class weights (default inverse_frequency)")
    group.add_argument("--label-smoothing", type=float, help="subtype CE label smoothing (default 0)")
    group.add_argument("--lesion-centred", type=_bool, dest="lesion_centred_sampling", metavar="yes|no",
                       help="centre foreground-forced patches on the lesion (default yes)")
    group.add_argument("--class-balanced", type=_bool, dest="class_balanced_sampling", metavar="yes|no",
                       help="sample cases so every subtype is seen equally often (default no)")
    group.add_argument("--small-lesion-oversampling", type=float, metavar="F",
                       help="draw training cases whose lesion is under 1 ml up to F times as often (1 / volume in ml, "
                            "at most F; default 1: nnU-Net's uniform draw)")
    group.add_argument("--oversample-foreground", type=float, dest="oversample_foreground_percent",
                       help="share of patches forced to contain foreground (nnU-Net: 0.33)")
    group.add_argument("--lesion-patches-only", type=_bool, dest="subtype_loss_on_lesion_patches_only",
                       metavar="yes|no", help="subtype loss only on patches that show lesion (default yes)")
    group.add_argument("--attend-true-lesion", type=_bool, dest="attend_to_true_lesion", metavar="yes|no",
                       help="lesion_attention head: pool over the true lesion while training (default yes)")
    group.add_argument("--imperfect-attention", type=_share, metavar="P",
                       help="with --attend-true-lesion yes: in this share of patches the head attends to the true "
                            "lesion cut by a random plane and blended with the decoder's own lesion probability, "
                            "as the decoder draws lesions on data from another scanner (default 0: off)")
    parser.add_argument("--cpu-bf16", type=_bool, dest="cpu_bf16", metavar="yes|no",
                        help="on CPU, run the forward pass under bfloat16 autocast: about 1.6x faster per step "
                             "on CPUs with AVX512-BF16 or AMX; steps with non-finite gradients are skipped "
                             "(default no)")
    group.add_argument("--feature-model", choices=["lda", "logistic"], dest="feature_model_kind",
                       help="linear model of the subtype classifier's feature branch: shrinkage LDA (default) or "
                            "logistic regression (C by cross-validation)")
    group.add_argument("--feature-set", choices=["all", "relative"], dest="feature_set",
                       help="features of the feature branch: all radiomics (default), or only those relative to the "
                            "parenchyma around the lesion (ratios to it, HU histogram shape), which a change of "
                            "scanner or contrast timing moves less")
    group.add_argument("--shift-calibration", type=_bool, metavar="yes|no",
                       help="also predict each validation case under 8 acquisition shifts (contrast timing, HU "
                            "offset, kernel noise and blur, thick slices) and fit the head's temperature on those "
                            "too, so its confidence holds on other scanners (default yes; 8 fast predictions per "
                            "validation case)")
    group.add_argument("--case-validation-every", type=int,
                       help="epochs between case-level validations, the first and last epoch always "
                            "included (default 10: under 10 %% of a full-size epoch on a GPU)")
    group.add_argument("--final-validation-fast", type=_bool, metavar="yes|no",
                       help="predict the validation fold at the end in fast mode instead of nnU-Net's default "
                            "(step 0.5, mirroring) (default no)")
    parser.add_argument("--no-validation", action="store_true", help="skip the final validation-fold prediction")
    parser.add_argument("--validation-only", action="store_true",
                        help="do not train: predict the validation fold with the final checkpoint and decide the "
                             "postprocessing again (largest component, false-lesion filters), as nnU-Net's --val; "
                             "with several folds, on all their validation cases together. Training options need "
                             "not be repeated")
    add_workdir_argument(parser)
    parser.set_defaults(func=run, interrupted="the checkpoint of the last finished epoch is kept: add --resume "
                                                "to continue from it")
    register_fit_classifier(subparsers)
    register_ext_trainer_path(subparsers)


def run(args: argparse.Namespace) -> int:
    from nnunet_mtl import paths

    paths.configure(args.workdir)
    from nnunet_mtl.training.run import TrainSettings, train_folds

    settings = TrainSettings(
        epochs=args.epochs, iterations=args.iterations, val_iterations=args.val_iterations,
        initial_lr=args.initial_lr, classification_loss_weight=args.classification_loss_weight,
        class_weighting=args.class_weighting, label_smoothing=args.label_smoothing,
        lesion_centred_sampling=args.lesion_centred_sampling, class_balanced_sampling=args.class_balanced_sampling,
        small_lesion_oversampling=args.small_lesion_oversampling,
        oversample_foreground_percent=args.oversample_foreground_percent,
        case_validation_every=args.case_validation_every,
        final_validation_fast=args.final_validation_fast, frozen_parts=tuple(args.freeze),
        subtype_loss_on_lesion_patches_only=args.subtype_loss_on_lesion_patches_only,
        attend_to_true_lesion=args.attend_to_true_lesion, imperfect_attention=args.imperfect_attention,
        cpu_bf16=args.cpu_bf16, optimizer=args.optimizer,
        mirror_augmentation=args.mirror_augmentation, intensity_augmentation=args.intensity_augmentation,
        thick_slice_mm=args.thick_slice_mm, lesion_contrast_augmentation=args.lesion_contrast_augmentation,
        max_rotation_degrees=args.max_rotation_degrees,
        feature_model_kind=args.feature_model_kind, feature_set=args.feature_set,
        shift_calibration=args.shift_calibration, lesion_loss_weight=args.lesion_loss_weight)
    try:
        result = train_folds(args.dataset, args.plans, args.fold, args.device, settings, resume=args.resume,
                             initial_weights=args.initial_weights, validate=not args.no_validation,
                             validation_only=args.validation_only)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise CliError(str(e)) from None
    print(f"model folder: {result['model_folder']}")
    return 0


def register_fit_classifier(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fit-classifier", help="refit a trained model's subtype classifier from its stored per-case records",
        description="Fits the feature model, the temperatures and the fusion weight again from the records the "
                    "folds wrote (fold_<k>/subtype_records.json), without predicting again, and rewrites "
                    "subtype_classifier.json in the model folder. Out-of-fold when several cross-validation folds "
                    "are there, else from one fold's training and validation cases.",
        epilog="example:\n  nnunet-mtl fit-classifier work/nnUNet_results/Dataset501_Pancreas/"
               "nnUNetTrainerMTL__nnUNetPlans_MTLdemo__3d_fullres --feature-model logistic",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="trained model folder")
    parser.add_argument("-f", "--folds", nargs="+", default=None, help="folds whose records to use (default: all)")
    parser.add_argument("--feature-model", choices=["lda", "logistic"], default="lda")
    parser.add_argument("--feature-set", choices=["all", "relative"], default="all")
    parser.add_argument("--shift-calibration", type=_bool, default=True, metavar="yes|no",
                        help="fit the head's temperature also on the validation cases under acquisition shifts, "
                             "where the records hold them (default yes)")
    parser.set_defaults(func=run_fit_classifier)


def run_fit_classifier(args: argparse.Namespace) -> int:
    import json

    from nnunet_mtl.training.subtype_fit import fit_from_model_folder

    dataset_json = args.model / "dataset.json"
    if not dataset_json.is_file():
        raise CliError(f"{args.model} is not a trained model folder (no dataset.json)")
    names = json.loads(dataset_json.read_text()).get("subtype_names")
    if not names:
        raise CliError(f"{dataset_json} has no subtype_names")
    try:
        classifier = fit_from_model_folder(args.model, [names[str(i)] for i in range(len(names))], args.folds,
                                           args.feature_model, args.feature_set, args.shift_calibration)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    path = classifier.save(args.model)
    print(f"wrote {path}\n{json.dumps(classifier.provenance, indent=1)}")
    for variant, numbers in classifier.validation.items():
        if numbers:
            print(f"held-out {variant:<19} " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                        for k, v in numbers.items()))
    return 0


def register_ext_trainer_path(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ext-trainer-path", help="print the folder to set as nnUNet_extTrainer for nnU-Net's own CLI",
        epilog="example:\n  export nnUNet_extTrainer=$(nnunet-mtl ext-trainer-path)\n"
               "  nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainerMTL -p nnUNetPlans_MTL -num_gpus 2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=lambda args: print(ext_trainer_path()) or 0)


def ext_trainer_path() -> str:
    import nnunet_mtl

    return str(Path(nnunet_mtl.__file__).parent / "nnunet_ext")
