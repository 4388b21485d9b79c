"""``nnunet-mtl evaluate`` (case-level metrics of a prediction folder) and ``nnunet-mtl report`` (figures + HTML)."""

from __future__ import annotations

import argparse

from nnunet_mtl.cli import CliError


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser(
        "evaluate", help="case-level segmentation and subtype metrics of a prediction folder",
        description="Compare a prediction folder (<case>.nii.gz masks + subtype_results.csv [+ "
                    "subtype_probabilities.csv]) with the truth; write metrics.json and metrics_per_case.csv. "
                    "Whole-pancreas Dice is label > 0, lesion Dice label == 2; surface metrics use the voxel "
                    "spacing in mm. Both masks empty: Dice/NSD 1, HD95 0; one empty: Dice/NSD 0, HD95 = image "
                    "diagonal. Lesion-wise: 26-connected lesion components of truth and prediction, a true lesion "
                    "is detected when a predicted component has IoU > --lesion-iou with it; sensitivity by size, "
                    "false-positive lesions per case, Dice of detected lesions, and (with predict's "
                    "lesion_candidates.csv) the FROC curve and lesion-presence AUC; one row per lesion in "
                    "metrics_per_lesion.csv.")
    evaluate.add_argument("--pred", required=True, help="prediction folder")
    evaluate.add_argument("--truth", required=True,
                          help="nnU-Net raw dataset folder (evaluates the validation cases of --fold from "
                               "splits_final.json) or a folder of truth masks <case>.nii.gz")
    evaluate.add_argument("--subtypes", default=None,
                          help="truth subtypes, a Names,Subtype CSV (default: dataset.json's case_subtypes, or "
                               "subtype_results.csv inside a mask folder)")
    evaluate.add_argument("--fold", type=int, default=0, help="validation fold of an nnU-Net dataset (default 0)")
    evaluate.add_argument("--images", default=None,
                          help="folder of images <case>_0000.nii.gz for the report's overlays (default: imagesTr "
                               "of an nnU-Net dataset)")
    evaluate.add_argument("--tolerance-mm", type=float, default=2.0,
                          help="tolerance of the normalised surface Dice in mm (default 2)")
    evaluate.add_argument("--out", default=None, help="where to write the metrics (default: the prediction folder)")
    evaluate.add_argument("--lesion-bins", type=_bin_edges, default=(0.2, 1.0, 5.0), metavar="ML,ML,...",
                          help="edges of the lesion size bins in ml (default 0.2,1,5: < 0.2, 0.2-1, 1-5, >= 5 ml)")
    evaluate.add_argument("--lesion-iou", type=float, default=0.1,
                          help="IoU above which a predicted lesion component matches a true lesion (default 0.1)")
    evaluate.add_argument("--lesion-min-ml", type=float, default=0.1,
                          help="the headline lesion sensitivity and the FROC count true lesions of at least this "
                               "volume in ml (default 0.1)")
    evaluate.set_defaults(func=run_evaluate, interrupted="nothing was written: run it again")

    report = subparsers.add_parser(
        "report", help="figures and a self-contained report.html from evaluate's metrics or a training fold",
        description="Write PNG figures (confusion matrix, Dice distribution, training curves, reliability "
                    "diagram, CT overlays of the best/median/worst cases) and one self-contained report.html.")
    report.add_argument("run_dir", metavar="RUN_OR_OUTPUT_DIR",
                        help="a prediction folder holding metrics.json, or a training fold folder (with "
                             "training_curves.json and validation/metrics.json)")
    report.add_argument("--training-dir", default=None,
                        help="training fold folder with training_curves.json (default: found next to the run)")
    report.add_argument("--out", default=None, help="output folder (default: RUN_OR_OUTPUT_DIR/report)")
    report.set_defaults(func=run_report, interrupted="report.html was not written (figures may be): run it again")


def _bin_edges(text: str) -> tuple[float, ...]:
    try:
        edges = tuple(float(v) for v in text.split(","))
    except ValueError:
        edges = ()
    if not edges or any(e <= 0 for e in edges) or list(edges) != sorted(set(edges)):
        raise argparse.ArgumentTypeError(f"expected increasing positive volumes in ml like 0.2,1,5, got {text!r}")
    return edges


def run_evaluate(args: argparse.Namespace) -> int:
    from nnunet_mtl.evaluation.evaluate import EvaluationError, evaluate_folder, format_summary

    if not 0 <= args.lesion_iou < 1:
        raise CliError(f"--lesion-iou must lie in [0, 1), got {args.lesion_iou}")
    try:
        summary = evaluate_folder(args.pred, args.truth, subtypes_csv=args.subtypes, fold=args.fold,
                                  images_dir=args.images, tolerance_mm=args.tolerance_mm, out_dir=args.out,
                                  lesion_size_bins_ml=args.lesion_bins, lesion_iou_threshold=args.lesion_iou,
                                  lesion_min_volume_ml=args.lesion_min_ml)
    except EvaluationError as e:
        raise CliError(str(e)) from None
    print(format_summary(summary))
    print(f"wrote metrics.json, metrics_per_case.csv and metrics_per_lesion.csv to {args.out or args.pred}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from nnunet_mtl.evaluation.report import ReportError, build_report

    try:
        html = build_report(args.run_dir, training_dir=args.training_dir, out_dir=args.out)
    except ReportError as e:
        raise CliError(str(e)) from None
    print(f"wrote {html} and its figures")
    return 0
