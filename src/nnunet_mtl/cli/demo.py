"""``nnunet-mtl demo``: the whole pipeline on embedded phantom data (what `make demo` runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_mtl.cli import CliError

EPILOG = """\
stages (each reused when already done; --fresh starts over):
  phantom data -> import -> plan + preprocess (demo preset) -> train (demo plans, fold 0) ->
  predict test (fast) -> evaluate vs phantom truth -> report -> submission zip (checked)
outputs under WORKDIR: phantom/, nnUNet_raw/, nnUNet_preprocessed/, nnUNet_results/, demo_predictions/
(masks, subtype_results.csv, metrics.json, report/report.html), demo_submission.zip, demo_summary.json

example:
  nnunet-mtl demo --workdir work
"""


def _counts(text: str) -> tuple[int, int, int]:
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError("expected three comma-separated numbers, e.g. 3,5,4")
    return values  # type: ignore[return-value]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the whole pipeline on embedded phantom data",
                                   description=__doc__, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("work"), help="where everything goes (default: work)")
    parser.add_argument("--fresh", action="store_true", help="delete WORKDIR first and redo every stage")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 32)")
    parser.add_argument("--iterations", type=int, default=None, help="iterations per epoch (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--train-per-subtype", type=_counts, default=None, metavar="A,B,C",
                        help="phantom training cases per subtype (default: the small preset's 15,25,20)")
    parser.add_argument("--val-per-subtype", type=_counts, default=None, metavar="A,B,C")
    parser.add_argument("--test-cases", type=int, default=None)
    parser.add_argument("--engine", choices=["torch", "openvino", "onnxruntime", "auto"], default="auto",
                        help="what runs the network for the test predictions, as in predict (default: auto)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="fp32 or bf16 (default: bf16 where the CPU computes it natively, else fp32)")
    parser.set_defaults(func=run, interrupted="finished stages are kept (training keeps its last finished "
                                                "epoch): run it again to go on")


def run(args: argparse.Namespace) -> int:
    from nnunet_mtl.demo import DemoConfig, format_result, run_demo

    config = DemoConfig(workdir=args.workdir, seed=args.seed, train_per_subtype=args.train_per_subtype,
                        val_per_subtype=args.val_per_subtype, n_test=args.test_cases, device=args.device,
                        engine=args.engine, precision=args.precision, fresh=args.fresh)
    if args.epochs is not None:
        config.epochs = args.epochs
    if args.iterations is not None:
        config.iterations = args.iterations
    try:
        result = run_demo(config)
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as e:
        raise CliError(str(e)) from None
    print(format_result(result))
    return 0
