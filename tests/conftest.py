"""Shared fixtures: one tiny phantom dataset, imported, planned and trained once per test session.

The tiny model is trained for one epoch of two iterations: enough to exercise every code path (training, saving,
loading, predicting, exporting), not to be accurate. Accuracy belongs to `make demo` and the benchmarks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("nnUNet_def_n_proc", "1")
os.environ.setdefault("nnUNet_compile", "false")

REPO = Path(__file__).resolve().parents[1]
REAL_CT = REPO / "tests" / "data" / "real-ct"  # a real abdominal CT (TotalSegmentator, Apache-2.0)
TINY_DATASET_ID = 990
TINY_PLANS = "nnUNetPlans_MTLtiny"


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


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> dict[str, Path]:
    """Phantom (2/2/2 train, 1/1/1 validation, 3 test) -> import -> plan (demo preset) -> tiny plans."""
    from nnunet_mtl import paths

    root = tmp_path_factory.mktemp("tiny")
    work = paths.configure(root / "work")
    from nnunet_mtl.data.importer import import_dataset, scan_published
    from nnunet_mtl.data.phantom import generate_phantom_dataset
    from nnunet_mtl.planning.plans import plan_and_preprocess

    phantom = root / "phantom"
    generate_phantom_dataset(phantom, "small", seed=7, train_per_subtype=(2, 2, 2), val_per_subtype=(1, 1, 1),
                             n_test=3, progress=False)
    import_dataset(scan_published(phantom), work.raw, TINY_DATASET_ID, "Tiny", progress=False)
    plan_and_preprocess(TINY_DATASET_ID, "default", "demo", num_processes=1)
    preprocessed = work.preprocessed / f"Dataset{TINY_DATASET_ID}_Tiny"
    write_tiny_plans(preprocessed)
    return {"root": root, "workdir": root / "work", "phantom": phantom, "preprocessed": preprocessed,
            "raw": work.raw / f"Dataset{TINY_DATASET_ID}_Tiny"}


@pytest.fixture()
def tiny_env(tiny_dataset):
    """Point nnU-Net's folders at the tiny dataset's work folder for this test."""
    from nnunet_mtl import paths

    saved = {k: os.environ.get(k) for k in [*paths.NNUNET_FOLDERS, "nnUNet_n_proc_DA"]}
    paths.configure(tiny_dataset["workdir"])
    # Data augmentation in the main process (no worker pools to spawn on a 2-core machine). Only here: nnU-Net's
    # planner sizes torch threads from the same variable and rejects 0.
    os.environ["nnUNet_n_proc_DA"] = "0"
    yield tiny_dataset
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_model(tiny_dataset) -> Path:
    """A model folder trained for one epoch of two iterations on the tiny dataset (fold 0)."""
    from nnunet_mtl import paths
    from nnunet_mtl.training.run import TrainSettings, train

    paths.configure(tiny_dataset["workdir"])
    os.environ["nnUNet_n_proc_DA"] = "0"
    settings = TrainSettings(epochs=1, iterations=2, val_iterations=1, final_validation_fast=True)
    result = train(TINY_DATASET_ID, TINY_PLANS, 0, "cpu", settings)
    return Path(result["model_folder"])


def crop_phantom_test_images(tiny_dataset: dict[str, Path], folder: Path, size_xyz=(48, 48, 20)) -> list[str]:
    """The tiny dataset's phantom test images cropped around their pancreas (a few tiles of the tiny model, so a
    case predicts in a fraction of a second), written to ``folder`` as ``<case>_0000.nii.gz``; returns the cases."""
    import numpy as np
    import SimpleITK as sitk

    phantom = tiny_dataset["phantom"]
    folder.mkdir(parents=True, exist_ok=True)
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (phantom / "test").glob("*_0000.nii.gz"))
    for case in cases:
        image = sitk.ReadImage(str(phantom / "test" / f"{case}_0000.nii.gz"))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom / "test_groundtruth" / f"{case}.nii.gz")))
        centre = np.argwhere(truth > 0).mean(0)[::-1].astype(int)  # x, y, z
        size = np.array(image.GetSize())
        lo = np.clip(centre - np.array(size_xyz) // 2, 0, size - size_xyz)
        crop = image[int(lo[0]):int(lo[0]) + size_xyz[0], int(lo[1]):int(lo[1]) + size_xyz[1],
                     int(lo[2]):int(lo[2]) + size_xyz[2]]
        sitk.WriteImage(crop, str(folder / f"{case}_0000.nii.gz"), True)
    return cases
