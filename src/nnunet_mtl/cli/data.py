"""``nnunet-mtl import``: check a dataset and write it into nnUNet_raw (all files checked, all problems listed)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnunet_mtl.cli import CliError, add_workdir_argument

# Kept literal here so --help needs no numpy/SimpleITK; tests check they equal the importer's defaults.
DEFAULT_NAME = "Pancreas"
DEFAULT_LABELS = "background,pancreas,lesion"
DEFAULT_CHANNEL = "CT"
DEFAULT_FOLDS = 5
DEFAULT_SEED = 12345

EPILOG = """\
published layout (SOURCE):
  SOURCE/train/subtype<k>/quiz_<k>_<id>.nii.gz        mask
  SOURCE/train/subtype<k>/quiz_<k>_<id>_0000.nii.gz   image
  SOURCE/validation/subtype<k>/...                    same
  SOURCE/test/quiz_<id>_0000.nii.gz                   test images (optional folder)
generic layout:
  --images DIR (<case>_0000.nii.gz or <case>.nii.gz), --masks DIR (<case>.nii.gz),
  --classes CSV with header case,class[,split]; split is train or validation. Integer classes keep their
  values, other class names are sorted and indexed.

Writes nnUNet_raw/Dataset<NNN>_<name>/ with imagesTr, labelsTr (uint8), imagesTs, dataset.json (plus
subtype_names and case_subtypes) and splits_final.json (fold 0 = train/validation, then --folds stratified
cross-validation folds over the training cases). Masks stored as floats within 1e-3 of an integer are rounded.
Hidden files are ignored; other unexpected files in the layout folders are errors. Exit status 2 on any problem,
and then nothing is written.

examples:
  nnunet-mtl import data/ --dataset-id 3
  nnunet-mtl import --images img/ --masks seg/ --classes classes.csv --dataset-id 4 --name Kidney \\
      --labels background,kidney,tumour
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import", help="check a dataset (published or generic layout) and write it into nnUNet_raw",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", type=Path, help="root of the published layout")
    generic = parser.add_argument_group("generic layout (instead of SOURCE)")
    generic.add_argument("--images", type=Path, help="folder of images <case>_0000.nii.gz or <case>.nii.gz")
    generic.add_argument("--masks", type=Path, help="folder of masks <case>.nii.gz")
    generic.add_argument("--classes", type=Path, help="CSV with header case,class or case,class,split")
    generic.add_argument("--test-images", type=Path, help="folder of test images (optional)")
    parser.add_argument("--dataset-id", type=int, required=True, help="nnU-Net dataset id (1..999)")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"dataset name (default: {DEFAULT_NAME})")
    parser.add_argument("--labels", default=DEFAULT_LABELS,
                        help=f"label names in value order, background first (default: {DEFAULT_LABELS})")
    parser.add_argument("--channel-name", default=DEFAULT_CHANNEL,
                        help=f"nnU-Net channel name; 'CT' selects CT normalisation (default: {DEFAULT_CHANNEL})")
    parser.add_argument("--folds", type=int, default=DEFAULT_FOLDS,
                        help=f"cross-validation folds after fold 0 (default: {DEFAULT_FOLDS})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"seed of the cross-validation split (default: {DEFAULT_SEED})")
    parser.add_argument("--force", action="store_true", help="replace an existing dataset of the same id and name")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_workdir_argument(parser)
    parser.set_defaults(func=run_import, interrupted="nothing was written (import is all or nothing): run it again")


def run_import(args: argparse.Namespace) -> int:
    generic = [args.images, args.masks, args.classes]
    if args.source is not None and (any(generic) or args.test_images):
        raise CliError("give either SOURCE (published layout) or --images/--masks/--classes (generic layout)")
    if args.source is None and not all(generic):
        raise CliError("give SOURCE (published layout) or all of --images, --masks and --classes (generic layout)")
    if args.folds < 1:
        raise CliError(f"--folds {args.folds}: need at least 1")

    from nnunet_mtl import paths
    from nnunet_mtl.data import importer

    work = paths.configure(args.workdir)
    if args.source is not None:
        source = importer.scan_published(args.source)
    else:
        source = importer.scan_generic(args.images, args.masks, args.classes, args.test_images)
    labels = [name.strip() for name in args.labels.split(",")]
    try:
        report = importer.import_dataset(source, work.raw, args.dataset_id, args.name, labels, args.channel_name,
                                         args.force, args.folds, args.seed, progress=not args.no_progress)
    except importer.DatasetImportError as e:
        _print_warnings(e.notes)
        raise CliError(str(e)) from None
    _print_warnings(report.warnings)
    if (work.preprocessed / report.target.name).exists():
        _print_warnings([f"{work.preprocessed / report.target.name} was made from the previous import: plan "
                         "and preprocess again (remove that folder first if the splits changed)"])
    print(report.table())
    return 0


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
