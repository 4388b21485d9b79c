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
                    "diagonal.")
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


def run_evaluate(args: argparse.Namespace) -> int:
    from nnunet_mtl.evaluation.evaluate import EvaluationError, evaluate_folder, format_summary

    try:
        summary = evaluate_folder(args.pred, args.truth, subtypes_csv=args.subtypes, fold=args.fold,
                                  images_dir=args.images, tolerance_mm=args.tolerance_mm, out_dir=args.out)
    except EvaluationError as e:
        raise CliError(str(e)) from None
    print(format_summary(summary))
    print(f"wrote metrics.json and metrics_per_case.csv to {args.out or args.pred}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from nnunet_mtl.evaluation.report import ReportError, build_report

    try:
        html = build_report(args.run_dir, training_dir=args.training_dir, out_dir=args.out)
    except ReportError as e:
        raise CliError(str(e)) from None
    print(f"wrote {html} and its figures")
    return 0
