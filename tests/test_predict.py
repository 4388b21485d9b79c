"""Prediction: geometry, output format, tile aggregation, one encoder pass per tile, resume, bad cases."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import REAL_CT

from nnunet_mtl.cli import main as cli_main
from nnunet_mtl.inference.outputs import read_probability_table
from nnunet_mtl.inference.predict import PredictionMode, load_predictor, predict_folder
from nnunet_mtl.inference.predictor import TileRecord, aggregate_subtype_logits, lesion_centre

CPU = torch.device("cpu")


def softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def test_mean_aggregation_averages_logits():
    records = [TileRecord(torch.tensor([2.0, 0.0, 0.0]), 0.0), TileRecord(torch.tensor([0.0, 4.0, 0.0]), 50.0)]
    assert np.allclose(aggregate_subtype_logits(records, "mean"), softmax(np.array([1.0, 2.0, 0.0])))


def test_lesion_weighted_aggregation_follows_the_lesion_tiles():
    records = [TileRecord(torch.tensor([3.0, 0.0, 0.0]), 0.0), TileRecord(torch.tensor([0.0, 0.0, 3.0]), 30.0),
               TileRecord(torch.tensor([0.0, 3.0, 0.0]), 10.0)]
    expected = softmax((np.array([0, 0, 3.0]) * 30 + np.array([0, 3.0, 0]) * 10) / 40)
    assert np.allclose(aggregate_subtype_logits(records, "lesion_weighted"), expected)
    # no lesion anywhere: falls back to the plain mean
    no_lesion = [TileRecord(r.logits, 0.0) for r in records]
    assert np.allclose(aggregate_subtype_logits(no_lesion, "lesion_weighted"),
                       aggregate_subtype_logits(no_lesion, "mean"))


def test_folds_count_equally_whatever_their_number_of_records():
    lesion_patch = TileRecord(torch.tensor([0.0, 0.0, 4.0]), 30.0, fold=0)  # a fold that found the lesion
    no_lesion = [TileRecord(torch.tensor([2.0, 0.0, 0.0]), 0.0, fold=1) for _ in range(5)]  # one that did not
    expected = softmax((np.array([0.0, 0.0, 4.0]) + np.array([2.0, 0.0, 0.0])) / 2)
    for method in ("lesion_tile", "lesion_weighted"):
        assert np.allclose(aggregate_subtype_logits([lesion_patch, *no_lesion], method), expected)


def test_lesion_centre_picks_the_lesion_in_the_gland_over_a_larger_one_outside():
    labels = np.zeros((12, 40, 40), np.uint8)
    labels[3:9, 5:20, 5:20] = 1  # the gland
    labels[5:8, 10:13, 10:13] = 2  # its lesion: 27 voxels
    labels[2:9, 28:35, 28:35] = 2  # a larger false lesion away from it: 343 voxels, the largest component
    assert lesion_centre(labels, 2).tolist() == [6, 11, 11]
    labels[labels == 1] = 0
    labels[0:12, 0:3, 0:40] = 1  # the largest foreground component holds no lesion: the largest lesion anywhere
    assert lesion_centre(labels, 2).tolist() == [5, 31, 31]
    gland = np.ones((8, 16, 8), np.uint8)
    gland[1:4, 1:4, 1:4] = 2  # 27 voxels and 27 more touching them only corner to corner: one lesion of 54
    gland[4:7, 4:7, 4:7] = 2  # voxels, as nnU-Net's largest-component postprocessing counts (26-connectivity)
    gland[1:5, 9:15, 1:3] = 2  # 48 voxels: the largest under 6-connectivity
    assert lesion_centre(gland, 2).tolist() == [4, 4, 4]
    assert lesion_centre(np.ones((4, 4, 4), np.uint8), 2) is None


def write_image(path: Path, array: np.ndarray, spacing, origin, direction) -> None:
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))


def assert_same_geometry(mask_file: Path, image_file: Path) -> None:
    mask, image = sitk.ReadImage(str(mask_file)), sitk.ReadImage(str(image_file))
    assert mask.GetSize() == image.GetSize()
    assert np.allclose(mask.GetSpacing(), image.GetSpacing())
    assert np.allclose(mask.GetOrigin(), image.GetOrigin())
    assert np.allclose(mask.GetDirection(), image.GetDirection())
    assert mask.GetPixelID() == sitk.sitkUInt8


def test_predict_keeps_geometry_and_writes_the_task_format(tiny_model, tiny_dataset, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    source = sorted((tiny_dataset["phantom"] / "test").glob("*_0000.nii.gz"))[0]
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(source)))
    rotation = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # axes permuted: not identity, still orthonormal
    write_image(images / "quiz_901_0000.nii.gz", array, (0.83, 1.17, 2.6), (-120.5, 33.25, 7.0), rotation)
    shutil.copy(source, images / "quiz_902_0000.nii.gz")
    shutil.copy(REAL_CT / "example_ct.nii.gz", images / "quiz_903_0000.nii.gz")  # a real abdominal CT, 3 mm
    out = tmp_path / "out"
    report = predict_folder(tiny_model, images, out, device=CPU, mode=PredictionMode.fast(), progress=False)
    assert not report.failed and len(report.predicted) == len(list(images.iterdir()))
    for image in images.iterdir():
        case = image.name.removesuffix("_0000.nii.gz")
        assert_same_geometry(out / f"{case}.nii.gz", image)
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz"))))) <= {0, 1, 2}
    lines = (out / "subtype_results.csv").read_text().splitlines()
    assert lines[0] == "Names,Subtype"
    cases = sorted(p.name.removesuffix("_0000.nii.gz") for p in images.iterdir())
    assert [line.split(",")[0] for line in lines[1:]] == [f"{c}.nii.gz" for c in cases]
    probabilities = read_probability_table(out)
    for line in lines[1:]:
        name, subtype = line.split(",")
        p = probabilities[name.removesuffix(".nii.gz")]
        assert np.isclose(p.sum(), 1, atol=1e-4) and int(subtype) == int(np.argmax(p))


def test_one_network_pass_per_tile_serves_both_heads(tiny_model, tiny_dataset):
    # lesion_weighted: the tiles' own records, no extra lesion-centred pass
    predictor = load_predictor(tiny_model, device=CPU, mode=PredictionMode(use_mirroring=True,
                                                                          aggregation="lesion_weighted"))
    encoder_calls = []
    handle = predictor.network.encoder.register_forward_hook(lambda *a: encoder_calls.append(1))
    image = sorted((tiny_dataset["phantom"] / "test").glob("*_0000.nii.gz"))[0]
    pm, cm = predictor.plans_manager, predictor.configuration_manager
    data, _, _ = cm.preprocessor_class(verbose=False).run_case([str(image)], None, pm, cm, predictor.dataset_json)
    predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data))
    handle.remove()
    n_mirrors = 2 ** len(predictor.allowed_mirroring_axes)
    n_tiles = len(predictor._internal_get_sliding_window_slicers(
        tuple(max(s, p) for s, p in zip(data.shape[1:], cm.patch_size))))
    assert len(predictor.tile_records) == n_tiles  # one subtype record per tile (mirrors averaged inside)
    assert len(encoder_calls) == n_tiles * n_mirrors  # ...from the same encoder passes as the segmentation


class _LesionAt(torch.nn.Module):
    """Stands in for the network: lesion where the input is above 1, subtype logits that name the input's shape."""

    def forward(self, x):
        segmentation = torch.zeros(x.shape[0], 3, *x.shape[2:])
        segmentation[:, 0] = 1.0
        segmentation[:, 2] = 2.0 * (x[:, 0] > 1)
        return segmentation, torch.tensor([[float(x.shape[2]), float(x.shape[3]), float(x.shape[4])]])


def test_fast_mode_takes_the_subtype_from_a_patch_centred_on_the_lesion(tiny_model):
    predictor = load_predictor(tiny_model, device=CPU, mode=PredictionMode.fast())
    predictor.network = _LesionAt()
    patch = np.array(predictor.configuration_manager.patch_size)
    image = torch.zeros(1, *(patch * [1, 2, 2]))
    image[0, 2:4, -6:-2, 3:7] = 5.0  # one lesion near a corner
    predictor.predict_with_current_weights(image)
    (record,) = predictor.tile_records
    assert record.logits.tolist() == patch.tolist()  # the patch-sized tile decided, not the whole crop
    assert record.lesion_voxels == 2 * 4 * 4  # and it holds the whole lesion
    predictor.predict_with_current_weights(torch.zeros(1, *(patch * [1, 2, 2])))  # no lesion: the single pass
    (record,) = predictor.tile_records
    assert record.logits.tolist() == (patch * [1, 2, 2]).tolist()
    predictor.aggregation = "lesion_weighted"  # a single pass takes the lesion patch whatever the aggregation
    predictor.predict_with_current_weights(image)
    (record,) = predictor.tile_records
    assert record.logits.tolist() == patch.tolist()
    thin = image[:, 1:-1]  # a crop thinner than the patch: the lesion's tile is padded up to the patch
    logits, _ = predictor.predict_with_current_weights(thin)
    (record,) = predictor.tile_records
    assert record.logits.tolist() == patch.tolist() and record.lesion_voxels == 2 * 4 * 4
    assert tuple(logits.shape[1:]) == tuple(thin.shape[1:])


def test_tiled_prediction_takes_the_subtype_from_a_patch_centred_on_the_lesion(tiny_model):
    predictor = load_predictor(tiny_model, device=CPU, mode=PredictionMode(use_mirroring=False, tile_step_size=1.0))
    predictor.network = _LesionAt()
    patch = np.array(predictor.configuration_manager.patch_size)
    image = torch.zeros(1, *(patch * [1, 3, 3]))
    image[0, 1:3, patch[1] - 2:patch[1] + 2, 3:7] = 5.0  # one lesion across a tile border
    _, probabilities = predictor.predict_with_current_weights(image)
    (record,) = predictor.tile_records  # the nine tiles' records gave way to one lesion-centred patch
    assert record.logits.tolist() == patch.tolist() and record.lesion_voxels == 2 * 4 * 4
    assert np.allclose(probabilities, softmax(patch.astype(float)))
    predictor.aggregation = "lesion_weighted"  # tiles weighted by their lesion: both tiles that hold half of it
    predictor.predict_with_current_weights(image)
    assert len(predictor.tile_records) == 9
    assert sorted(r.lesion_voxels for r in predictor.tile_records)[-2:] == [2 * 2 * 4, 2 * 2 * 4]


def test_interrupted_prediction_resumes_without_redoing_finished_cases(tiny_model, tiny_dataset, tmp_path,
                                                                       monkeypatch):
    import nnunet_mtl.inference.predict as predict_module

    images = tiny_dataset["phantom"] / "test"
    out = tmp_path / "out"
    original = predict_module.predict_case
    calls = []

    def killed_on_second(*args, **kwargs):
        calls.append(args[3])  # the case id
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(predict_module, "predict_case", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        predict_folder(tiny_model, images, out, device=CPU, mode=PredictionMode.fast(), progress=False)
    finished = [p.name for p in out.glob("*.nii.gz")]
    assert len(finished) == 1 and not list(out.glob(".*"))  # nothing half-written
    monkeypatch.setattr(predict_module, "predict_case", original)
    report = predict_folder(tiny_model, images, out, device=CPU, mode=PredictionMode.fast(), progress=False)
    assert report.skipped == [calls[0]] and len(report.predicted) == 2
    assert len((out / "subtype_results.csv").read_text().splitlines()) == 1 + 3


def test_a_corrupt_case_is_reported_and_the_others_predicted(tiny_model, tiny_dataset, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(tiny_dataset["phantom"] / "test", images)
    (images / "quiz_950_0000.nii.gz").write_bytes(b"this is not a nifti file")
    nan_image = sitk.GetImageFromArray(np.full((8, 16, 16), np.nan, dtype=np.float32))
    sitk.WriteImage(nan_image, str(images / "quiz_951_0000.nii.gz"))
    out = tmp_path / "out"
    code = cli_main(["predict", "-i", str(images), "-o", str(out), "-m", str(tiny_model), "--fast",
                     "--device", "cpu"])
    assert code == 1
    rows = (out / "subtype_results.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 and not any("quiz_95" in r for r in rows)
    report = predict_folder(tiny_model, images, out, device=CPU, mode=PredictionMode.fast(), progress=False)
    assert set(report.failed) == {"quiz_950", "quiz_951"}
    assert "quiz_950_0000.nii.gz" in report.failed["quiz_950"] and "is not a NIfTI file" in report.failed["quiz_950"]
    assert "NaN" in report.failed["quiz_951"]


@pytest.mark.parametrize("problem", ["missing", "empty", "inside"])
def test_bad_folders_are_refused_before_any_work(problem, tiny_model, tmp_path, capsys):
    images = tmp_path / "images"
    out = tmp_path / "out"
    if problem != "missing":
        images.mkdir()
    if problem == "inside":
        write_image(images / "a_0000.nii.gz", np.zeros((4, 8, 8)), (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
        out = images / "out"
    code = cli_main(["predict", "-i", str(images), "-o", str(out), "-m", str(tiny_model), "--device", "cpu"])
    assert code == 2
    error = capsys.readouterr().err
    assert {"missing": "does not exist", "empty": "holds no images", "inside": "must not be inside"}[problem] in error
    assert not (tmp_path / "out").exists() or problem == "inside"


def test_stock_nnunet_predictor_uses_our_model_folder(tiny_model, tiny_dataset, tmp_path):
    """Our results folder stays an nnU-Net results folder: nnU-Net's own predictor (found via nnUNet_extTrainer)
    writes segmentation masks from it."""
    from nnunet_mtl.cli.train import ext_trainer_path

    out = tmp_path / "stock"
    env = {**os.environ, "nnUNet_extTrainer": ext_trainer_path()}
    code = ("from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor\n"
            "import torch, sys\n"
            "p = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device('cpu'),"
            " allow_tqdm=False)\n"
            "p.initialize_from_trained_model_folder(sys.argv[1], use_folds=(0,))\n"
            "p.predict_from_files(sys.argv[2], sys.argv[3], num_processes_preprocessing=1,"
            " num_processes_segmentation_export=1)\n")
    subprocess.run([sys.executable, "-c", code, str(tiny_model), str(tiny_dataset["phantom"] / "test"), str(out)],
                   check=True, env=env, capture_output=True)
    for image in (tiny_dataset["phantom"] / "test").glob("*_0000.nii.gz"):
        assert_same_geometry(out / image.name.replace("_0000", ""), image)
