"""``nnunet-mtl plan``: nnU-Net's fingerprint, planning and preprocessing, then the derived multi-task plans."""

from __future__ import annotations

import argparse

from nnunet_mtl.cli import CliError, add_workdir_argument

EPILOG = """\
writes into nnUNet_preprocessed/Dataset<NNN>_<name>/:
  nnUNetPlans.json (or nnUNetResEncUNetMPlans.json)   nnU-Net's own plans, untouched
  nnUNetPlans_3d_fullres/                             nnU-Net's preprocessed data (shared by all plans below)
  nnUNetPlans_MTL.json                                multi-task plans: our network around nnU-Net's U-Net
  nnUNetPlans_MTLdemo.json                            with --preset demo: 4 stages, 16 base features, patch
                                                      <= 24x48x48 (--demo-patch), batch 2 (trains on 2 CPU
                                                      cores in minutes)
  splits_final.json                                   copied from the import by nnU-Net: fold 0 = published split

examples:
  nnunet-mtl plan 501 --preset demo
  nnunet-mtl plan 501 --preset demo --demo-patch 24 64 64
  nnunet-mtl plan Dataset501_Pancreas --planner resenc-m --head multiscale
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plan", help="plan and preprocess with nnU-Net, write multi-task plans",
                                   description=__doc__, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="dataset id (e.g. 501) or name (Dataset501_Pancreas)")
    parser.add_argument("--planner", choices=["default", "resenc-m"], default="default",
                        help="nnU-Net planner: default (ExperimentPlanner, PlainConvUNet) or resenc-m "
                             "(nnUNetPlannerResEncM, ResidualEncoderUNet)")
    parser.add_argument("--preset", choices=["demo"], default=None,
                        help="also write a small CPU-friendly configuration (plans only, same preprocessing)")
    parser.add_argument("--head", choices=["lesion_attention", "lesion_context", "bottleneck", "multiscale"],
                        default="lesion_attention",
                        help="classification head: lesion_attention (features of every encoder stage "
                             "pooled where the decoder predicts lesion, + MLP; default), lesion_context (the same "
                             "plus the gland around the lesion: its intensity and the lesion's contrast with it), "
                             "bottleneck (the report's global average pool + linear) or multiscale (global avg+max "
                             "pool of the last 3 stages + MLP)")
    parser.add_argument("--demo-patch", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="the demo preset's largest patch (default 24 48 48; rounded down to what the "
                             "network's strides divide, never above nnU-Net's own patch): a larger field of view "
                             "costs training time in proportion to its voxels")
    parser.add_argument("--processes", type=int, default=None, help="worker processes (default: nnUNet_def_n_proc)")
    parser.add_argument("--force", action="store_true", help="redo fingerprint and preprocessing")
    parser.add_argument("--check-dataset", action="store_true",
                        help="run nnU-Net's own integrity check too (reads every file again; `import` has checked "
                             "them: for raw files edited since)")
    add_workdir_argument(parser)
    parser.set_defaults(func=run, interrupted="planning and preprocessing start over when run again")


def run(args: argparse.Namespace) -> int:
    from nnunet_mtl import paths

    paths.configure(args.workdir)
    from nnunet_mtl.planning.plans import plan_and_preprocess

    try:
        written = plan_and_preprocess(args.dataset, args.planner, args.preset, args.head, args.processes,
                                      args.force, args.check_dataset, demo_patch=args.demo_patch)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise CliError(str(e)) from None
    for name, path in written.items():
        print(f"multi-task plans {name}: {path}")
    return 0
