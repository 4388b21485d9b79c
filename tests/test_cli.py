"""The command line as a whole: `--help` lists every command, no command is dropped silently, and every command
is run by at least one test through the CLI itself."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from nnunet_mtl import cli
from nnunet_mtl.cli import main

TESTS = Path(__file__).resolve().parent
CLI_SOURCES = TESTS.parent / "src" / "nnunet_mtl" / "cli"
# The commands the README documents, in pipeline order.
DOCUMENTED = ["phantom", "import", "plan", "summary", "train", "ext-trainer-path", "predict", "submission",
              "check-submission", "evaluate", "report", "demo"]


def commands_in_help(capsys: pytest.CaptureFixture) -> list[str]:
    """The command names `nnunet-mtl --help` prints under COMMAND, in order."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    section = text.split("COMMAND\n", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^ {4}(\S+)", section, flags=re.MULTILINE)


def commands_in_sources() -> set[str]:
    """Every `add_parser("name"` in the CLI package, read from the files rather than from the running parser."""
    names = set()
    for source in CLI_SOURCES.glob("*.py"):
        names |= set(re.findall(r"add_parser\(\s*\"([a-z-]+)\"", source.read_text()))
    return names


def test_help_lists_every_command_in_pipeline_order(capsys):
    listed = commands_in_help(capsys)
    assert len(listed) == len(set(listed))
    assert set(listed) == commands_in_sources()  # nothing registered in a module is missing from --help
    assert [c for c in listed if c in DOCUMENTED] == DOCUMENTED  # the documented ones, in pipeline order
    modules = {p.stem for p in CLI_SOURCES.glob("*.py")} - {"__init__"}
    assert set(cli.COMMAND_MODULES) == modules  # every command module is loaded


def test_a_command_module_that_fails_to_import_stops_the_cli(monkeypatch):
    """It used to be skipped without a word, and --help then simply lacked the command."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "no_such_command"])
    with pytest.raises(ModuleNotFoundError, match="nnunet_mtl.cli.no_such_command"):
        cli.build_parser()
    with pytest.raises(ModuleNotFoundError):
        main(["--help"])


def test_every_command_is_run_by_a_cli_level_test(capsys):
    """In process (`main(["cmd", ...])`, `cli_main([...])`; conftest.py's `run_cli([...])` builds the session's
    dataset with `import` and `plan`, which test_plan.py checks) or as `python -m nnunet_mtl cmd`."""
    called = set()
    for test_file in [*TESTS.glob("test_*.py"), TESTS / "conftest.py"]:
        text = test_file.read_text()
        called |= set(re.findall(r"(?:main|run_cli)\(\[\s*\"([a-z-]+)\"", text))
        called |= set(re.findall(r"\"-m\",\s*\"nnunet_mtl\",\s*\"([a-z-]+)\"", text))
    missing = [c for c in commands_in_help(capsys) if c not in called]
    assert missing == []


def test_ext_trainer_path_names_the_folder_holding_our_trainer(capsys):
    from nnunet_mtl.training.trainer import nnUNetTrainerMTL

    assert main(["ext-trainer-path"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    spec = importlib.util.spec_from_file_location("ext_trainers", folder / "nnunet_mtl_trainers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.nnUNetTrainerMTL is nnUNetTrainerMTL  # nnU-Net's lookup by name finds our class there
