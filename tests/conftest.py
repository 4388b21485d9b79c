"""Shared fixtures: one tiny phantom dataset, imported and planned through the CLI, and one tiny model trained on
it, once per test session; a seed before every test; nnU-Net's folder variables set per test and restored after.

The tiny model is trained for one seeded epoch of a few iterations: enough to exercise every code path (training,
saving, loading, predicting, exporting) and to segment the gland roughly, not to be accurate. Accuracy belongs to
`make demo` and the benchmarks. Constants and helpers shared by test files live in tiny.py and volumes.py (test files
never import this module).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from tiny import (
    TINY_DATASET,
    TINY_DATASET_ID,
    TINY_PLANS,
    TINY_TEST_CASES,
    TINY_TRAIN_PER_SUBTYPE,
    TINY_VAL_PER_SUBTYPE,
)

# Process-wide on purpose: nnU-Net reads these once, when its modules are first imported.
os.environ.setdefault("nnUNet_def_n_proc", "1")
os.environ.setdefault("nnUNet_compile", "false")

SEED = 0


def seed_everything(seed: int = SEED) -> None:
    """Python's, numpy's and torch's generators: nnU-Net's sampling and augmentation draw from all three."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test starts from the same random state, whatever ran before it."""
    seed_everything()


def point_nnunet_at(mp: pytest.MonkeyPatch, workdir: Path, augmentation_workers: str) -> None:
    """nnU-Net's three folders under ``workdir`` and its augmentation worker count, set through ``mp`` so they
    are restored when ``mp`` is undone (paths.configure writes the same values into os.environ)."""
    from nnunet_mtl import paths

    for var, sub in paths.NNUNET_FOLDERS.items():
        mp.setenv(var, str(workdir / sub))
    mp.setenv("nnUNet_n_proc_DA", augmentation_workers)
    paths.configure(workdir)


def write_tiny_plans(preprocessed: Path) -> str:
    """Demo plans shrunk further (patch 16x32x32, features 8..64) so a CPU training step takes a fraction of a
    second; written as plans only, like every configuration change."""
    plans = json.loads((preprocessed / "nnUNetPlans_MTLdemo.json").read_text())
    plans["plans_name"] = TINY_PLANS
    configuration = plans["configurations"]["3d_fullres"]
    configuration["patch_size"] = [16, 32, 32]
    kwargs = configuration["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [8 * 2 ** i for i in range(kwargs["n_stages"])]
    (preprocessed / f"{TINY_PLANS}.json").write_text(json.dumps(plans, indent=1))
    return TINY_PLANS


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``nnunet-mtl argv`` in process: exit status and what it printed."""
    from nnunet_mtl.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(argv)
    return code, printed.getvalue()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> dict:
    """Phantom (2/2/3 train, 1/1/1 validation, 3 test) -> `nnunet-mtl import` -> `nnunet-mtl plan --preset demo`
    -> tiny plans. The CLI's exit codes and output are kept for the tests of those commands."""
    from nnunet_mtl.data.phantom import generate_phantom_dataset

    root = tmp_path_factory.mktemp("tiny")
    work = root / "work"
    phantom = root / "phantom"
    with pytest.MonkeyPatch.context() as mp:
        # the planner sizes torch threads from the augmentation worker count and rejects 0
        point_nnunet_at(mp, work, augmentation_workers="1")
        generate_phantom_dataset(phantom, "small", seed=7, train_per_subtype=TINY_TRAIN_PER_SUBTYPE,
                                 val_per_subtype=TINY_VAL_PER_SUBTYPE, n_test=TINY_TEST_CASES, progress=False)
        imported = run_cli(["import", str(phantom), "--dataset-id", str(TINY_DATASET_ID), "--name", "Tiny",
                            "--no-progress", "--workdir", str(work)])
        planned = run_cli(["plan", str(TINY_DATASET_ID), "--preset", "demo", "--processes", "1",
                           "--workdir", str(work)])
        assert imported[0] == 0 and planned[0] == 0, (imported, planned)
        preprocessed = work / "nnUNet_preprocessed" / TINY_DATASET
        write_tiny_plans(preprocessed)
    return {"root": root, "workdir": work, "phantom": phantom, "preprocessed": preprocessed,
            "raw": work / "nnUNet_raw" / TINY_DATASET, "results": work / "nnUNet_results" / TINY_DATASET,
            "import": imported, "plan": planned}


@pytest.fixture()
def tiny_env(tiny_dataset, monkeypatch):
    """nnU-Net's folders point at the tiny dataset's work folder for this test, and back afterwards.

    Data augmentation runs in the main process (no worker pools to spawn on a 2-core machine, and seeded)."""
    point_nnunet_at(monkeypatch, tiny_dataset["workdir"], augmentation_workers="0")
    return tiny_dataset


@pytest.fixture(scope="session")
def tiny_test_crops(tiny_dataset, tmp_path_factory) -> Path:
    """The tiny dataset's three test images cropped around their gland (read only): prediction tests that check
    files, tables, resumption or engines, not accuracy against the whole-image truth, predict these in a fraction of
    the time."""
    from volumes import crop_phantom_test_images

    folder = tmp_path_factory.mktemp("test_crops")
    crop_phantom_test_images(tiny_dataset, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_dataset) -> Path:
    """A model folder trained on the tiny dataset (fold 0), seeded; its validation fold predicted and scored."""
    from nnunet_mtl.training.run import TrainSettings, train

    settings = TrainSettings(epochs=1, iterations=2, val_iterations=1, final_validation_fast=True)
    with pytest.MonkeyPatch.context() as mp:
        point_nnunet_at(mp, tiny_dataset["workdir"], augmentation_workers="0")
        seed_everything()
        result = train(TINY_DATASET_ID, TINY_PLANS, 0, "cpu", settings)
    return Path(result["model_folder"])
