"""``nnunet-mtl phantom``: write the embedded synthetic dataset in the published layout, so every later command
runs without downloading anything."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from nnunet_mtl.cli import CliError

# Kept literal here so --help needs no numpy/SimpleITK; a test checks it matches the generator's presets.
PRESETS = ("small", "full")
SITES = ("A", "B", "C")

EPILOG = """\
writes OUT/:
  train/subtype<k>/quiz_<k>_<id>.nii.gz            mask (0 background, 1 pancreas, 2 lesion)
  train/subtype<k>/quiz_<k>_<id>_0000.nii.gz       CT image, int16 HU
  validation/subtype<k>/...                        same
  test/quiz_<id>_0000.nii.gz                       test images only
  test_groundtruth/quiz_<id>.nii.gz                test masks, kept apart
  test_groundtruth/subtype_results.csv             Names,Subtype
  preview/*.png                                    with --preview
  phantom.json                                     parameters and per-case facts
Subtypes: 0 hypodense irregular solid, 1 near-water cyst with septa, 2 hyper-enhancing round mass. About three
quarters of the masks are float32 with label 1 stored as 1.0000152587890625, like the real data.

presets:
  small  24-32 x 100-122 x 122-155 voxels, spacing ~[2.0, 1.05, 1.05] mm; default counts 15,25,20 / 3,5,4 / 36
  full   40-90 x 120-260 x 150-300 voxels, spacing ~[2.0, 0.75, 0.75] mm; the real counts 62,106,84 / 9,15,12 / 72

sites (scanner, protocol and patient mix; train on one, test on another to see what carries over):
  A  the default: 2 mm slices, standard kernel, portal-venous phase
  B  3 mm slices, 0.8x pixel size, sharp kernel (more, finer noise), late phase (weaker enhancement), +0..12 HU;
     less hypodense solid masses, mostly unilocular cysts, dimmer hyper-enhancing masses, 20 % atypical
  C  1.5 mm slices, smooth kernel (less, coarser noise, more blur), early phase (stronger enhancement), -10..0 HU;
     very hypodense rough solid masses, multilocular thick-walled cysts, very bright masses, 16 % atypical

examples:
  nnunet-mtl phantom --out phantom_data --preview
  nnunet-mtl phantom --out phantom_site_b --site B --test-cases 150
  nnunet-mtl phantom --out phantom_full --preset full --seed 3
"""


def _counts(text: str) -> tuple[int, int, int]:
    """'A,B,C' -> three case counts, one per subtype."""
    try:
        counts = tuple(int(v) for v in text.split(","))
    except ValueError:
        counts = ()
    if len(counts) != 3 or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected three counts of at least 1 like 15,25,20, got {text!r}")
    return counts  # type: ignore[return-value]


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "phantom", help="write the synthetic phantom dataset (published layout)", description=__doc__,
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to create (must be empty or absent)")
    parser.add_argument("--preset", choices=PRESETS, default="small",
                        help="crop size and default counts (default: small)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same dataset (default: 0)")
    parser.add_argument("--site", choices=SITES, default="A",
                        help="scanner/protocol/patient-mix profile (default: A; see below)")
    parser.add_argument("--cases-per-subtype", type=_counts, metavar="A,B,C",
                        help="training cases of subtype 0,1,2 (default: the preset's, see below)")
    parser.add_argument("--val-per-subtype", type=_counts, metavar="A,B,C",
                        help="validation cases of subtype 0,1,2 (default: the preset's)")
    parser.add_argument("--test-cases", type=_non_negative, metavar="N",
                        help="test cases, subtypes in the real split's proportions (default: the preset's)")
    parser.add_argument("--preview", action="store_true",
                        help="also write PNGs of one case per subtype (axial and coronal, W400/L40)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it holds an earlier phantom dataset")
    parser.set_defaults(func=run, interrupted="nothing was written (the dataset is renamed into place when "
                                                "complete): run it again")


def run(args: argparse.Namespace) -> int:
    from nnunet_mtl.data.phantom import generate_phantom_dataset

    started = time.perf_counter()
    try:
        summary = generate_phantom_dataset(
            args.out, preset=args.preset, seed=args.seed, train_per_subtype=args.cases_per_subtype,
            val_per_subtype=args.val_per_subtype, n_test=args.test_cases, preview=args.preview, force=args.force,
            site=args.site)
    except (FileExistsError, ValueError) as e:
        raise CliError(str(e)) from e
    counts, volumes = summary["counts"], summary["lesion_volume_ml"]
    print(f"wrote {summary['n_cases']} phantom cases ({summary['preset']}, site {summary['site']}, "
          f"seed {summary['seed']}) to "
          f"{Path(args.out).resolve()} in {time.perf_counter() - started:.1f} s")
    print(f"  train {'/'.join(map(str, counts['train']))}, validation {'/'.join(map(str, counts['validation']))} "
          f"(subtype 0/1/2), test {counts['test']}")
    print(f"  lesion volume {volumes['min']:.2f}-{volumes['max']:.1f} ml (median {volumes['median']:.2f}); "
          f"float-mask quirk on {summary['float_mask_quirk_cases']} of {summary['n_cases']} masks")
    for png in summary["preview"]:
        print(f"  preview: {Path(args.out) / png}")
    return 0
