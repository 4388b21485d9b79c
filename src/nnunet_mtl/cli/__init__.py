"""Command line: ``nnunet-mtl <command>``. Each command lives in a small module that registers its parser and
imports the heavy machinery (torch, nnU-Net) only when it runs, so ``--help`` stays instant."""

from __future__ import annotations

import argparse
import sys

from nnunet_mtl import __version__

# Modules in pipeline order; each exposes register(subparsers).
COMMAND_MODULES = ["phantom", "data", "plan", "model", "train", "predict", "evaluate", "demo"]


class CliError(Exception):
    """An error the user caused; printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="nnunet-mtl",
        description="Multi-task nnU-Net v2: segment pancreas (1) and lesion (2) and classify the lesion subtype "
                    "per case, with one shared encoder. Pipeline: phantom -> import -> plan -> train -> predict "
                    "-> evaluate -> report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nnunet-mtl {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        # No command is dropped silently: a module that fails to import stops the CLI with that module's error
        # (a --help that quietly lost a command would tell the user the command does not exist).
        importlib.import_module(f"nnunet_mtl.cli.{name}").register(subparsers)
    return parser


def add_workdir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=None,
                        help="folder holding nnUNet_raw/, nnUNet_preprocessed/, nnUNet_results/ (default: "
                             "$NNUNET_MTL_WORKDIR or ./nnunet_mtl_work; nnU-Net's own variables win when set "
                             "and --workdir is not given)")


# What an interrupted command (Ctrl-C) leaves; each command says what is true for it (set_defaults(interrupted=...)).
DEFAULT_INTERRUPTED = "nothing half-written is left; run the same command again"


def main(argv: list[str] | None = None) -> int:
    from nnunet_mtl import paths

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    paths.forget_created()
    code = 2
    try:
        code = int(args.func(args) or 0)
    except CliError as e:
        print(f"nnunet-mtl {args.command}: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"nnunet-mtl {args.command}: interrupted; {getattr(args, 'interrupted', DEFAULT_INTERRUPTED)}",
              file=sys.stderr)
        code = 130
    finally:
        if code != 0:
            paths.remove_empty_created()
    return code


if __name__ == "__main__":
    sys.exit(main())
