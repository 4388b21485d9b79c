"""kill -9 and Ctrl-C: the same command again gives what an uninterrupted run gives, with no leftovers, and no
process of a killed run stays alive (data-loader workers of `train` included).

The killed runs are real processes (``python -m nnunet_mtl``), killed with SIGKILL at seeded points of their work
(found by watching their output appear); the runs after them are in process, to keep the tests short.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tiny import TINY_DATASET_ID, TINY_PLANS
from volumes import crop_phantom_test_images

from nnunet_mtl.cli import main

POLL_S = 0.005
TIMEOUT_S = 600  # a generous ceiling on a loaded machine; the work itself takes seconds


def spawn(*argv: object, **env: str) -> subprocess.Popen:
    """``python -m nnunet_mtl ARGV`` (its output is not needed: what it writes is watched)."""
    return subprocess.Popen([sys.executable, "-m", "nnunet_mtl", *map(str, argv)], env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(condition, process: subprocess.Popen, what: str, poll_s: float = POLL_S) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert process.poll() is None, f"the process ended (status {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)


def kill_9(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*")) if folder.exists() else []


# ------------------------------------------------------------------------------------------------------- import


def write_nifti(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 2.0))
    sitk.WriteImage(image, str(path), True)


def digest(folder: Path) -> dict[str, bytes]:
    """Every file of a dataset folder by relative path (NIfTI files by their voxels and header, via SimpleITK)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.endswith(".nii.gz"):
            image = sitk.ReadImage(str(path))
            files[str(path.relative_to(folder))] = (sitk.GetArrayFromImage(image).tobytes()
                                                    + repr((image.GetSpacing(), image.GetOrigin())).encode())
        else:
            files[str(path.relative_to(folder))] = path.read_bytes()
    return files


def test_import_killed_at_random_points_then_run_again(tmp_path):
    """Three kill -9 at seeded points of the work (after 1..n-1 images are in the temporary dataset), then the same
    command: the dataset of an uninterrupted import, no temporary folder left."""
    rng = np.random.default_rng(0)
    source = tmp_path / "source"
    for number in range(1, 31):
        subtype = number % 3
        folder = source / ("validation" if number > 27 else "train") / f"subtype{subtype}"
        write_nifti(folder / f"quiz_{subtype}_{number:03d}_0000.nii.gz",
                    rng.integers(-100, 200, (8, 24, 24)).astype(np.int16))
        mask = np.zeros((8, 24, 24), np.uint8)
        mask[2:6, 6:18, 6:18] = 1
        mask[3:5, 8:12, 8:12] = 2
        write_nifti(folder / f"quiz_{subtype}_{number:03d}.nii.gz", mask)
    argv = ["import", source, "--dataset-id", 7, "--no-progress"]
    reference = tmp_path / "reference"
    assert main([str(a) for a in [*argv, "--workdir", reference]]) == 0

    work = tmp_path / "work"
    raw = work / "nnUNet_raw"
    for written in random.Random(0).sample(range(1, 21), 3):
        process = spawn(*argv, "--workdir", work)
        wait_for(lambda n=written: sum(1 for _ in raw.glob(".Dataset007_*/imagesTr/*")) >= n, process,
                 f"{written} images in the temporary dataset")
        kill_9(process)
        assert not (raw / "Dataset007_Pancreas").exists()  # all or nothing
        assert hidden(raw), "the kill left no temporary folder: it came too late to test anything"
    assert main([str(a) for a in [*argv, "--workdir", work]]) == 0
    assert digest(raw / "Dataset007_Pancreas") == digest(reference / "nnUNet_raw" / "Dataset007_Pancreas")
    assert hidden(raw) == []


# ------------------------------------------------------------------------------------------------------ predict


def test_predict_killed_at_random_points_then_run_again(tiny_dataset, tiny_model, tmp_path):
    """Two kill -9 in a row (seeded delays after the first and the third mask appear), then the same command: masks
    and tables identical to an uninterrupted run, no temporary left."""
    crops = tmp_path / "crops"
    images = tmp_path / "images"
    images.mkdir()
    cases = []
    for copy in ("a", "b"):  # six small cases, so that the kills fall inside the work
        for case in crop_phantom_test_images(tiny_dataset, crops):
            shutil.copyfile(crops / f"{case}_0000.nii.gz", images / f"{case}{copy}_0000.nii.gz")
            cases.append(f"{case}{copy}")
    argv = ["predict", "-i", images, "-m", tiny_model, "--fast", "--device", "cpu"]
    reference = tmp_path / "reference"
    assert main([str(a) for a in [*argv, "-o", reference]]) == 0

    out = tmp_path / "out"
    delays = random.Random(1)
    for finished in (1, 3):
        process = spawn(*argv, "-o", out)
        wait_for(lambda n=finished: len(list(out.glob("[!.]*.nii.gz"))) >= n, process, f"{finished} masks")
        time.sleep(delays.uniform(0, 0.15))
        kill_9(process)
        table = out / "subtype_results.csv"
        listed = [row.split(",")[0] for row in table.read_text().splitlines()[1:]] if table.exists() else []
        assert all((out / name).is_file() for name in listed)  # a table never lists a mask not yet written
        assert len(listed) < len(cases), "the kill came after the last case"
    assert main([str(a) for a in [*argv, "-o", out]]) == 0
    assert hidden(out) == []
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for case in cases:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz"))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(reference / f"{case}.nii.gz"))))
    for table in ("subtype_results.csv", "subtype_probabilities.csv"):
        assert (out / table).read_text() == (reference / table).read_text()


def test_ctrl_c_during_predict_says_finished_cases_are_kept(tiny_dataset, tiny_model, tmp_path, capsys,
                                                            monkeypatch):
    import nnunet_mtl.inference.predict as predict_module

    images = tmp_path / "images"
    crop_phantom_test_images(tiny_dataset, images)
    original, calls = predict_module.infer_case, []

    def interrupted(*args, **kwargs):
        calls.append(args[1].case)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(predict_module, "infer_case", interrupted)
    code = main(["predict", "-i", str(images), "-o", str(tmp_path / "out"), "-m", str(tiny_model), "--fast",
                 "--device", "cpu"])
    assert code == 130
    assert "interrupted; finished cases are kept: run the same command again" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([
        f"{calls[0]}.nii.gz", "lesion_candidates.csv", "subtype_details.json", "subtype_probabilities.csv",
        "subtype_results.csv"])


# -------------------------------------------------------------------------------------------------------- train


def process_tree(root: int) -> set[tuple[int, str]]:
    """(pid, start time) of ``root`` and all its descendants, from /proc (psutil is not a dependency)."""
    parents: dict[int, int] = {}
    starts: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid], starts[pid] = int(fields[1]), fields[19]
    tree, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    return {(pid, starts[pid]) for pid in tree if pid in starts}


def alive(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """Those still running: same pid and start time (not a reused pid), and not a zombie."""
    left = set()
    for pid, start in processes:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[19] == start and fields[0] != "Z":
            left.add((pid, start))
    return left


@pytest.fixture()
def fold_2(tiny_env):
    """The killed training writes fold 2 into the tiny model's folder, and its final validation rewrites the model's
    own files (postprocessing.json, subtype_classifier.json: a one-fold model's decisions); the fold is removed and
    those files restored afterwards, so the other tests see the tiny model as it was trained."""
    from nnunet_mtl.training.run import build_trainer

    folder = Path(build_trainer(TINY_DATASET_ID, TINY_PLANS, 2, "cpu").output_folder)
    saved = {p: p.read_bytes() for p in folder.parent.iterdir() if p.is_file()}
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
    for p in folder.parent.iterdir():
        if p.is_file() and p not in saved:
            p.unlink()
    for p, content in saved.items():
        p.write_bytes(content)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc (Linux)")
def test_train_killed_mid_epoch_leaves_no_process_and_resumes_exactly(tiny_env, fold_2, capsys):
    """kill -9 of `train` in its second (last) epoch: every process of it ends (its data-loader workers too);
    --resume goes on from the last finished epoch with that checkpoint's weights, optimizer, schedule and log, and
    ends with a complete model folder."""
    from nnunet_mtl.training.run import TrainSettings, apply_settings, build_trainer

    epochs = 2
    argv = ["train", TINY_DATASET_ID, "--plans", TINY_PLANS, "--fold", 2, "--device", "cpu", "--epochs", epochs,
            "--iterations", 4, "--val-iterations", 1, "--case-validation-every", epochs,
            "--final-validation-fast", "yes", "--workdir", tiny_env["workdir"]]
    process = spawn(*argv, nnUNet_n_proc_DA="2")
    latest = fold_2 / "checkpoint_latest.pth"
    wait_for(latest.is_file, process, "the first epoch's checkpoint")
    wait_for(lambda: len(process_tree(process.pid)) >= 4, process, "the data-loader workers", 0.05)  # 2 train, 1 val
    time.sleep(random.Random(2).uniform(0.05, 0.3))
    tree = process_tree(process.pid)
    kill_9(process)
    deadline = time.monotonic() + 20
    while alive(tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive(tree) == set(), "processes of the killed run are still alive"

    saved = torch.load(latest, map_location="cpu", weights_only=True)
    finished = saved["current_epoch"]
    assert 1 <= finished < epochs, "the kill came after the last epoch"
    settings = TrainSettings(epochs=epochs, iterations=4, val_iterations=1, case_validation_every=epochs,
                             final_validation_fast=True)
    trainer = build_trainer(TINY_DATASET_ID, TINY_PLANS, 2, "cpu", continue_training=True)
    apply_settings(trainer, settings)
    trainer.initialize()
    trainer.load_checkpoint(str(latest))
    assert trainer.current_epoch == finished
    for name, tensor in trainer.network.state_dict().items():
        assert torch.equal(tensor, saved["network_weights"][name]), name
    assert_same(trainer.optimizer.state_dict(), saved["optimizer_state"])
    assert trainer.logger.get_checkpoint() == saved["logging"]
    trainer.lr_scheduler.step(finished)  # nnU-Net's schedule is a function of the epoch, as at each epoch start
    poly = (1 - finished / epochs) ** 0.9
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx(
        [trainer.initial_lr * poly * g["lr_scale"] for g in trainer.optimizer.param_groups])

    assert main([str(a) for a in [*argv, "--resume"]]) == 0
    assert f"resuming from {latest} at epoch {finished}" in capsys.readouterr().out
    final = torch.load(fold_2 / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert final["current_epoch"] == epochs
    log = final["logging"]
    assert len(log["train_losses"]) == epochs
    for key, values in saved["logging"].items():  # the log of the finished epochs goes on unchanged
        assert log[key][:finished] == values[:finished], key
    assert log["lrs"] == pytest.approx([trainer.initial_lr * (1 - e / epochs) ** 0.9 for e in range(epochs)])
    for name in ("checkpoint_best.pth", "progress.png", "training_curves.json", "validation/metrics.json",
                 "validation/subtype_results.csv"):
        assert (fold_2 / name).is_file(), name
    assert len(json.loads((fold_2 / "training_curves.json").read_text())["train_losses"]) == epochs
    assert hidden(fold_2) == []


def assert_same(a, b, where: str = "optimizer state") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where
