"""``nnunet-mtl predict``, ``submission`` and ``check-submission``: masks and subtypes in the task's format."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnunet_mtl.cli import CliError

EPILOG = """\
writes into OUT:
  <case>.nii.gz               uint8 mask (0 background, 1 pancreas, 2 lesion), same size, spacing, origin and
                              direction as <case>_0000.nii.gz
  subtype_results.csv         header exactly Names,Subtype; rows like quiz_037.nii.gz,0
  subtype_probabilities.csv   Names,Subtype,prob_0,prob_1,prob_2 (calibrated; each fold's, averaged),
                              lesion_found (1 when the mask holds a lesion, 0: the subtype is a guess),
                              lesion_volume_ml (predicted lesion volume), lesion_probability (largest score)
  subtype_details.json        per case: every classifier variant's probabilities, the head's logits per fold,
                              whether a lesion was found, its volume (ml) and its features
  lesion_candidates.csv       one row per lesion component of the masks: Names,component,voxels,volume_ml,
                              peak_z,peak_y,peak_x (voxel of the largest lesion probability, array z,y,x order),
                              max_probability (the score: largest softmax lesion probability in it),
                              mean_probability,in_gland (1: in the largest foreground component)

modes: default = nnU-Net's (Gaussian sliding window, step 0.5, mirroring). --fast = no mirroring, tile step 1.0,
and on CPU crops of up to 8 patch volumes in a single pass padded to the network stride only (README: measured
speed and accuracy). In every mode the subtype comes from one more patch-sized pass centred on the predicted lesion
in the gland (--aggregation lesion_tile), unmirrored unless --lesion-tile-mirroring yes.
Largest-component postprocessing and the false-lesion filters (minimum lesion volume, minimum lesion probability,
lesions outside the gland) follow the model's postprocessing.json (chosen on its validation fold) unless overridden.
A run started again skips cases already finished (their masks are read again first; a damaged one is predicted
again); a case that fails (an image cut short, damaged, not NIfTI, not 3D, with NaN) is reported by file, the others
are still predicted, and the exit status is 1 when any case failed. A damaged checkpoint is named, with the other
checkpoints of its folder (--checkpoint chooses one); exit status 2.

split across machines (nnU-Net's -num_parts/-part_id): --num-parts N --part-id K predicts the sorted cases
K, K+N, K+2N, ... of the folder; the N parts are disjoint and together complete. Every part writes its masks into
OUT and its tables and a manifest into OUT/parts/part_K_of_N/ (each part resumes on its own); `submission`
gathers the parts and refuses an incomplete set.

examples:
  nnunet-mtl predict -i data/test -o preds \\
      -m work/nnUNet_results/Dataset501_Pancreas/nnUNetTrainerMTL__nnUNetPlans_MTL__3d_fullres
  nnunet-mtl predict -i data/test -o preds -m MODEL --fast --device cuda
  nnunet-mtl predict -i data/test -o preds -m MODEL --num-parts 4 --part-id $SLURM_ARRAY_TASK_ID
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="masks and a subtype per case for a folder of CT images",
                                   description=__doc__, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--input", type=Path, required=True, help="folder of <case>_0000.nii.gz images")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder (created)")
    parser.add_argument("-m", "--model", type=Path, required=True,
                        help="trained model folder (nnUNetTrainerMTL__<plans>__3d_fullres)")
    parser.add_argument("-f", "--folds", nargs="+", default=None, help="folds to ensemble (default: all found)")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file name (default: checkpoint_final.pth, else best, else latest)")
    parser.add_argument("--fast", action="store_true", help="fast mode (see below)")
    parser.add_argument("--aggregation", choices=["lesion_tile", "lesion_weighted", "mean"], default="lesion_tile",
                        help="where the case's subtype comes from: lesion_tile (default) = one more patch centred "
                             "on the predicted lesion in the gland; lesion_weighted = tile logits weighted by their "
                             "predicted lesion volume; mean = plain mean over tiles (a fast-mode single pass uses "
                             "the lesion patch with any choice); folds count equally")
    parser.add_argument("--lesion-tile-mirroring", choices=["yes", "no"], default="no",
                        help="also mirror the lesion-centred patch the subtype comes from (default mode: 8 encoder "
                             "passes more per case, the cost of a whole crop of one tile; default no)")
    parser.add_argument("--classifier", choices=["cnn", "features", "fused"], default=None,
                        help="which subtype opinion to write: cnn = the network's head, features = the linear model "
                             "on the predicted lesion's radiomics, fused = both (log-probabilities weighted as the "
                             "model's held-out cases chose), each calibrated; default: the model's "
                             "(subtype_classifier.json; the head alone for models without one)")
    parser.add_argument("--largest-component", choices=["auto", "yes", "no"], default="auto",
                        help="keep only the largest connected pancreas component; auto = as the model's "
                             "validation decided (postprocessing.json in the model folder)")
    parser.add_argument("--lesion-filters", choices=["auto", "off"], default="auto",
                        help="remove likely false lesion components; auto = as the model's validation decided "
                             "(postprocessing.json), off = keep every predicted lesion")
    parser.add_argument("--min-lesion-ml", type=float, default=None, metavar="ML",
                        help="remove lesion components smaller than this (overrides the model's choice)")
    parser.add_argument("--min-lesion-probability", type=float, default=None, metavar="P",
                        help="remove lesion components whose largest lesion probability is below P (overrides "
                             "the model's choice)")
    parser.add_argument("--engine", choices=["torch", "openvino", "onnxruntime", "auto"], default="torch",
                        help="what runs the network on CPU: torch (default), openvino or onnxruntime (the whole "
                             "network exported once per checkpoint to MODEL/engine_cache), or auto (the fastest "
                             "installed engine at equal accuracy, measured once per model and CPU)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16 only on CPUs that compute it natively (AVX512-BF16 or AMX): torch autocast or "
                             "OpenVINO's bf16 inference precision")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--overwrite", action="store_true", help="predict finished cases again")
    parser.add_argument("--resampler", choices=["plans", "torch"], default="plans",
                        help="plans (default): the plans' resampling (scikit-image, CPU); torch: nnU-Net's torch "
                             "resampler on the prediction device (faster; masks agreed at Dice 0.98 pancreas / 0.95 "
                             "lesion on the tiny model, not yet measured at full size)")
    parser.add_argument("--num-parts", type=int, default=1, metavar="N",
                        help="split the folder's sorted cases into N parts (one per machine; default 1)")
    parser.add_argument("--part-id", type=int, default=0, metavar="K",
                        help="which part this run predicts, 0..N-1: cases K, K+N, K+2N, ... (default 0)")
    parser.set_defaults(func=run_predict, interrupted="finished cases are kept: run the same command again to "
                                                     "predict the others")

    sub = subparsers.add_parser("submission", help="zip masks + subtype_results.csv (flat) for the task",
                                epilog="A folder predicted in parts (--num-parts) is gathered first: every part "
                                       "must be there and finished, else nothing is written and the missing parts "
                                       "and cases are named.\n\nexample:\n  nnunet-mtl submission preds --zip "
                                       "results.zip --images data/test",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("prediction_dir", type=Path)
    sub.add_argument("--zip", type=Path, required=True, dest="zip_path")
    sub.add_argument("--images", type=Path, default=None,
                     help="test images folder: the gathered parts must cover exactly its cases")
    sub.set_defaults(func=run_submission, interrupted="no zip was written: run it again")

    check = subparsers.add_parser("check-submission", help="validate a submission zip against the test images",
                                  epilog="example:\n  nnunet-mtl check-submission results.zip --images data/test",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("zip_path", type=Path)
    check.add_argument("--images", type=Path, required=True, help="folder of test images <case>_0000.nii.gz")
    check.add_argument("--num-subtypes", type=int, default=3)
    check.set_defaults(func=run_check, interrupted="nothing was written")


def run_predict(args: argparse.Namespace) -> int:
    from nnunet_mtl.inference.engines import EngineUnavailable
    from nnunet_mtl.inference.parts import Part
    from nnunet_mtl.inference.predict import InputError, PredictionMode, predict_folder
    from nnunet_mtl.training.run import resolve_device

    try:
        part = Part(args.num_parts, args.part_id) if args.num_parts > 1 or args.part_id else None
    except ValueError as e:
        raise CliError(str(e)) from None
    largest = {"auto": None, "yes": True, "no": False}[args.largest_component]
    filters = _lesion_filters(args)
    options = {"largest_component": largest, "lesion_filters": filters, "classifier": args.classifier,
               "engine": args.engine, "precision": args.precision, "resampler": args.resampler,
               "lesion_tile_mirroring": args.lesion_tile_mirroring == "yes"}
    mode = PredictionMode.fast(args.aggregation, **options) if args.fast \
        else PredictionMode(aggregation=args.aggregation, **options)
    try:
        report = predict_folder(args.model, args.input, args.output, args.folds, args.checkpoint,
                                resolve_device(args.device), mode, overwrite=args.overwrite, part=part)
    except (InputError, EngineUnavailable, FileNotFoundError, RuntimeError) as e:
        raise CliError(str(e)) from None
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    times = list(report.seconds_per_case.values())
    mean = f", {sum(times) / len(times):.2f} s per case" if times else ""
    of_part = f" (part {part.part_id} of {part.num_parts})" if part else ""
    print(f"predicted {len(report.predicted)}{of_part}, kept {len(report.skipped)} from an earlier run, "
          f"failed {len(report.failed)}{mean}; outputs in {args.output}")
    for message in report.failed.values():
        print(f"FAILED {message}")
    return 1 if report.failed else 0


def _lesion_filters(args: argparse.Namespace):
    """None (the model's decision) unless switched off or overridden on the command line."""
    from nnunet_mtl.inference.lesion_filters import NO_FILTERS, LesionFilters, read_lesion_filters

    if args.min_lesion_ml is not None and args.min_lesion_ml < 0:
        raise CliError(f"--min-lesion-ml must be >= 0, got {args.min_lesion_ml}")
    if args.min_lesion_probability is not None and not 0 <= args.min_lesion_probability <= 1:
        raise CliError(f"--min-lesion-probability must lie in [0, 1], got {args.min_lesion_probability}")
    if args.lesion_filters == "off" and args.min_lesion_ml is None and args.min_lesion_probability is None:
        return NO_FILTERS
    if args.min_lesion_ml is None and args.min_lesion_probability is None:
        return None
    base = NO_FILTERS if args.lesion_filters == "off" else read_lesion_filters(args.model)
    return LesionFilters(base.min_volume_ml if args.min_lesion_ml is None else args.min_lesion_ml,
                         base.min_probability if args.min_lesion_probability is None else args.min_lesion_probability,
                         base.drop_outside_gland)


def run_submission(args: argparse.Namespace) -> int:
    from nnunet_mtl.inference.outputs import MASK_ENDING
    from nnunet_mtl.inference.parts import IncompleteParts, gather_parts
    from nnunet_mtl.inference.predict import InputError, check_folders
    from nnunet_mtl.inference.submission import SubmissionError, pack_submission

    try:
        expected = sorted(check_folders(args.images, args.prediction_dir)) if args.images else None
        gathered = gather_parts(args.prediction_dir, expected)
        if expected is not None:
            masks = {p.name[: -len(MASK_ENDING)] for p in args.prediction_dir.glob(f"*{MASK_ENDING}")
                     if not p.name.startswith(".")}
            missing = sorted(set(expected) - masks)
            if missing:
                raise CliError(f"{args.prediction_dir}: no mask for {len(missing)} of the {len(expected)} images in "
                               f"{args.images} ({', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}): "
                               "predict them first")
        cases = pack_submission(args.prediction_dir, args.zip_path)
    except (FileNotFoundError, SubmissionError, IncompleteParts, InputError) as e:
        raise CliError(str(e)) from None
    parts = f", gathered from {len(list((args.prediction_dir / 'parts').glob('part_*')))} parts" if gathered else ""
    print(f"{args.zip_path}: {len(cases)} masks + subtype_results.csv{parts}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from nnunet_mtl.inference.submission import check_submission

    problems = check_submission(args.zip_path, args.images, args.num_subtypes)
    if problems:
        for p in problems:
            print(f"- {p}")
        raise CliError(f"{args.zip_path}: {len(problems)} problem(s)")
    print(f"{args.zip_path}: valid")
    return 0
