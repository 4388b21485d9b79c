"""Where nnU-Net's three folders live.

nnU-Net reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` from the environment when its modules
are imported. Users who already export them keep them; everybody else gets one work folder (``--workdir`` or
``NNUNET_MTL_WORKDIR``, default ``./nnunet_mtl_work``) with the three folders inside, so nobody has to export three
variables. Call :func:`configure` before the first ``import nnunetv2``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORKDIR = "nnunet_mtl_work"
NNUNET_FOLDERS = {"nnUNet_raw": "nnUNet_raw", "nnUNet_preprocessed": "nnUNet_preprocessed",
                  "nnUNet_results": "nnUNet_results"}
# nnU-Net sizes every process pool from these; its defaults (8 and 12) oversubscribe small machines.
SMALL_MACHINE_DEFAULTS = {"nnUNet_def_n_proc": str(max(1, min(os.cpu_count() or 1, 4))),
                          "nnUNet_n_proc_DA": str(max(1, min(os.cpu_count() or 1, 4)))}


# Folders this process created, so a failed command can remove those it left empty (see cli.main).
_created: list[Path] = []


@dataclass(frozen=True)
class WorkPaths:
    raw: Path
    preprocessed: Path
    results: Path


def default_workdir() -> Path:
    return Path(os.environ.get("NNUNET_MTL_WORKDIR", DEFAULT_WORKDIR)).resolve()


def configure(workdir: str | os.PathLike | None = None) -> WorkPaths:
    """Set nnU-Net's folder variables (only those not already set) and small-machine worker counts."""
    base = Path(workdir).resolve() if workdir is not None else default_workdir()
    for var, sub in NNUNET_FOLDERS.items():
        if workdir is not None or not os.environ.get(var):
            # An explicit --workdir wins over inherited variables: the user asked for that folder.
            os.environ[var] = str(base / sub)
        make_dirs(Path(os.environ[var]))
    for var, value in SMALL_MACHINE_DEFAULTS.items():
        os.environ.setdefault(var, value)
    return current()


def current() -> WorkPaths:
    missing = [v for v in NNUNET_FOLDERS if not os.environ.get(v)]
    if missing:
        raise RuntimeError(f"nnU-Net folders not configured ({', '.join(missing)}); call paths.configure() first")
    return WorkPaths(Path(os.environ["nnUNet_raw"]), Path(os.environ["nnUNet_preprocessed"]),
                     Path(os.environ["nnUNet_results"]))


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def make_dirs(folder: Path) -> Path:
    """``mkdir -p`` that remembers which folders it created (:func:`remove_empty_created` undoes them)."""
    folder = Path(folder).absolute()
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    _created.extend(reversed(missing))
    return folder


def forget_created() -> None:
    _created.clear()


def remove_empty_created() -> list[Path]:
    """Remove the folders :func:`make_dirs` created that are still empty, deepest first: a failed command leaves
    no empty ``nnUNet_raw/``, ``nnUNet_results/`` or output folder behind."""
    removed = []
    for folder in sorted(set(_created), key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()  # only when empty
            removed.append(folder)
        except OSError:
            pass
    _created.clear()
    return removed
