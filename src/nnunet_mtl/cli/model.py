"""``nnunet-mtl summary``: true parameter counts of the multi-task network, per part."""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_mtl.cli import CliError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "summary", help="parameter counts (encoder, decoder, head, total) from the instantiated network",
        description="Builds the network from a plans file (or a trained model folder's plans.json) and counts "
                    "parameters from the modules; the decoder's reference to the encoder is not counted twice.",
        epilog="examples:\n  nnunet-mtl summary nnunet_mtl_work/nnUNet_preprocessed/Dataset501_Pancreas/"
               "nnUNetPlans_MTL.json\n  nnunet-mtl summary nnunet_mtl_work/nnUNet_results/Dataset501_Pancreas/"
               "nnUNetTrainerMTL__nnUNetPlans_MTLdemo__3d_fullres",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_or_plans", type=Path, help="plans JSON, or a model folder containing plans.json")
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--input-channels", type=int, default=1)
    parser.add_argument("--segmentation-classes", type=int, default=None,
                        help="output channels of the decoder (default: from the dataset.json beside the plans, "
                             "else 3)")
    parser.set_defaults(func=run, interrupted="nothing was written")


def run(args: argparse.Namespace) -> int:
    import json

    from nnunet_mtl.model.summary import network_from_plans, summary_table

    path = args.model_or_plans
    plans_file = path / "plans.json" if path.is_dir() else path
    if not plans_file.is_file():
        raise CliError(f"{plans_file} not found")
    classes = args.segmentation_classes
    dataset_json = plans_file.parent / "dataset.json"
    if classes is None and dataset_json.is_file():
        classes = len(json.loads(dataset_json.read_text())["labels"])
    try:
        network = network_from_plans(json.loads(plans_file.read_text()), args.configuration, args.input_channels,
                                     classes or 3)
    except (KeyError, ValueError, TypeError, ImportError) as e:
        raise CliError(f"{plans_file}: {e}") from None
    print(summary_table(network))
    return 0
