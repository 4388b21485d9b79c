"""Prediction: geometry, output format, tile aggregation, one encoder pass per tile, resume, bad cases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tiny import REAL_CT
from volumes import crop_phantom_test_images, read_array, write_volume

from nnunet_mtl.cli import main as cli_main
from nnunet_mtl.inference.outputs import read_probability_table
from nnunet_mtl.inference.predict import PredictionMode, load_predictor, predict_folder

CPU = torch.device("cpu")


def softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def assert_same_geometry(mask_file: Path, image_file: Path) -> None:
    mask, image = sitk.ReadImage(str(mask_file)), sitk.ReadImage(str(image_file))
    assert mask.GetSize() == image.GetSize()
    assert np.allclose(mask.GetSpacing(), image.GetSpacing())
    assert np.allclose(mask.GetOrigin(), image.GetOrigin())
    assert np.allclose(mask.GetDirection(), image.GetDirection())
    assert mask.GetPixelID() == sitk.sitkUInt8


def test_predict_keeps_geometry_and_writes_the_task_format(tiny_model, tiny_dataset, tmp_path):
    images = tmp_path / "images"
    # the test images cropped around the gland: whole images would spend minutes tiling with the tiny model
    case = crop_phantom_test_images(tiny_dataset, tmp_path / "crops")[0]
    source = tmp_path / "crops" / f"{case}_0000.nii.gz"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(source)))
    rotation = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # axes permuted: not identity, still orthonormal
    write_volume(images / "quiz_901_0000.nii.gz", array.astype(np.int16), (0.83, 1.17, 2.6), (-120.5, 33.25, 7.0),
                 rotation)
    shutil.copy(source, images / "quiz_902_0000.nii.gz")
    # a block of a real abdominal CT (3 mm, flipped axes): SimpleITK's slicing keeps its spacing and direction and
    # moves the origin to the block's first voxel, so the real header is what must come back
    real = sitk.ReadImage(str(REAL_CT / "example_ct.nii.gz"))
    sitk.WriteImage(real[40:64, 40:64, 48:64], str(images / "quiz_903_0000.nii.gz"), True)
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


@pytest.fixture(scope="module")
def both_modes(tiny_model, tiny_dataset, tmp_path_factory) -> dict[str, Path]:
    """One tiny test case predicted by the one seeded tiny model in fast mode and in default mode (nnU-Net's:
    Gaussian tiles at step 0.5 with mirroring, about 150 tiles x 8 mirrors here, hence one case)."""
    root = tmp_path_factory.mktemp("modes")
    case = crop_phantom_test_images(tiny_dataset, root / "crops", size_xyz=(80, 80, 24))[0]
    (root / "images").mkdir()
    shutil.copy(root / "crops" / f"{case}_0000.nii.gz", root / "images" / f"{case}_0000.nii.gz")
    for name, mode in (("fast", PredictionMode.fast()), ("default", PredictionMode())):
        report = predict_folder(tiny_model, root / "images", root / name, device=CPU, mode=mode, progress=False)
        assert not report.failed and len(report.predicted) == 1
    return {"images": root / "images", "fast": root / "fast", "default": root / "default"}


def test_default_mode_keeps_geometry_and_agrees_with_fast_mode(both_modes):
    (image,) = both_modes["images"].iterdir()
    name = image.name.replace("_0000", "")
    for mode in ("fast", "default"):
        assert_same_geometry(both_modes[mode] / name, image)
    fast, default = read_array(both_modes["fast"] / name), read_array(both_modes["default"] / name)
    assert (default > 0).sum() > 500  # the model segments tissue: two empty masks would agree trivially
    overlap = 2 * np.logical_and(fast > 0, default > 0).sum() / ((fast > 0).sum() + (default > 0).sum())
    # the tiny model (a few iterations) calls most of the crop foreground, so the two modes differ at its ragged
    # borders: 0.92 measured at main 2026-11-30; the demo model's agreement is bench/predict_speed.py's to report
    assert overlap >= 0.90, overlap
    fast, default = (read_probability_table(both_modes[m]) for m in ("fast", "default"))
    case = name.removesuffix(".nii.gz")
    assert list(fast) == list(default) == [case]
    assert int(np.argmax(fast[case])) == int(np.argmax(default[case]))


def test_one_network_pass_per_tile_serves_both_heads(tiny_model, tiny_dataset, tmp_path):
    # lesion_weighted: the tiles' own records, no extra lesion-centred pass
    predictor = load_predictor(tiny_model, device=CPU, mode=PredictionMode(use_mirroring=True,
                                                                          aggregation="lesion_weighted"))
    encoder_calls = []
    handle = predictor.network.encoder.register_forward_hook(lambda *a: encoder_calls.append(1))
    # 2 x 2 x 2 tiles: more than one per axis, and the count is what matters
    case = crop_phantom_test_images(tiny_dataset, tmp_path, size_xyz=(40, 40, 16))[0]
    image = tmp_path / f"{case}_0000.nii.gz"
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
    """Stands in for the network: lesion where the input is above 1, subtype logits that name the input's shape;
    counts its whole-network and encoder-and-head passes."""

    def __init__(self, attention_channels: int = 1):
        super().__init__()
        self.calls = []
        self.attention_channels = attention_channels
        self.attention = None

    def forward(self, x):
        self.calls.append("forward")
        segmentation = torch.zeros(x.shape[0], 3, *x.shape[2:])
        segmentation[:, 0] = 1.0
        segmentation[:, 2] = 2.0 * (x[:, 0] > 1)
        return segmentation, torch.tensor([[float(x.shape[2]), float(x.shape[3]), float(x.shape[4])]])

    def attention_from_probabilities(self, probabilities):  # as MultiTaskUNet's
        return probabilities[:, -self.attention_channels:]

    def classify(self, x, lesion_probability):
        self.calls.append("classify")
        assert lesion_probability.shape[2:] == x.shape[2:]
        self.attention = lesion_probability
        return torch.tensor([[float(x.shape[2]), float(x.shape[3]), float(x.shape[4])]])


def test_the_lesion_patch_attends_with_the_channels_the_head_asks_for(tiny_model):
    """A context head gets gland and lesion probability of the crop's pass, cut to the lesion's patch."""
    predictor = load_predictor(tiny_model, device=CPU, mode=PredictionMode.fast())
    for channels in (1, 2):
        predictor.network = _LesionAt(attention_channels=channels)
        patch = np.array(predictor.configuration_manager.patch_size)
        image = torch.zeros(1, *(patch * [1, 2, 2]))
        image[0, 2:4, -6:-2, 3:7] = 5.0
        predictor.predict_with_current_weights(image)
        attention = predictor.network.attention
        assert attention.shape == (1, channels, *patch)
        lesion = attention[0, -1] > 0.5
        assert int(lesion.sum()) == 2 * 4 * 4  # the lesion, last, whatever the channels
        if channels == 2:  # the channel before it: the pancreas class's probability (softmax of 1, 0, 2 / 1, 0, 0)
            expected = torch.where(lesion, 1 / (np.e + 1 + np.e ** 2), 1 / (np.e + 2)).float()
            assert torch.allclose(attention[0, 0], expected, atol=1e-5)


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
    # one network pass over the crop, then the encoder and head alone on the lesion's patch
    assert predictor.network.calls == ["forward", "classify"]
    predictor.lesion_tile_attention = "tile"  # the patch's own whole-network pass (before the cut): same record
    predictor.network.calls.clear()
    predictor.predict_with_current_weights(image)
    (record,) = predictor.tile_records
    assert record.logits.tolist() == patch.tolist() and record.lesion_voxels == 2 * 4 * 4
    assert predictor.network.calls == ["forward", "forward"]
    predictor.lesion_tile_attention = "crop"
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


def test_default_mode_mirrors_the_tiles_but_not_the_lesion_patch_unless_asked(tiny_model):
    for mirrored_patch in (False, True):
        predictor = load_predictor(tiny_model, device=CPU, mode=PredictionMode(
            tile_step_size=1.0, lesion_tile_mirroring=mirrored_patch))
        predictor.network = _LesionAt()
        patch = np.array(predictor.configuration_manager.patch_size)
        image = torch.zeros(1, *patch)  # one tile
        image[0, 2:4, 3:7, 3:7] = 5.0
        n_mirrors = 2 ** len(predictor.allowed_mirroring_axes)
        assert n_mirrors > 1
        patch_passes = n_mirrors if mirrored_patch else 1
        predictor.predict_with_current_weights(image)
        assert predictor.network.calls == ["forward"] * n_mirrors + ["classify"] * patch_passes
        (record,) = predictor.tile_records
        assert record.logits.tolist() == patch.tolist() and record.lesion_voxels == 2 * 4 * 4
        predictor.lesion_tile_attention = "tile"  # the patch's own whole-network pass follows the same setting
        predictor.network.calls.clear()
        predictor.predict_with_current_weights(image)
        assert predictor.network.calls == ["forward"] * (n_mirrors + patch_passes)
        assert predictor.use_mirroring  # restored for the next case's tiles


@pytest.mark.parametrize("flags, mirrored_patch", [([], False), (["--lesion-tile-mirroring", "yes"], True),
                                                    (["--fast", "--lesion-tile-mirroring", "yes"], True)])
def test_the_lesion_tile_mirroring_option_reaches_the_prediction_mode(flags, mirrored_patch, monkeypatch, tmp_path):
    import nnunet_mtl.inference.predict as predict_module

    modes = []

    def record_mode(*args, **kwargs):
        modes.append(args[6])
        return predict_module.PredictionReport()

    monkeypatch.setattr(predict_module, "predict_folder", record_mode)
    assert cli_main(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(tmp_path),
                     "--device", "cpu", *flags]) == 0
    (mode,) = modes
    assert mode.lesion_tile_mirroring is mirrored_patch
    assert mode.use_mirroring is ("--fast" not in flags)


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


def test_interrupted_prediction_resumes_without_redoing_finished_cases(tiny_model, tiny_test_crops, tmp_path,
                                                                       monkeypatch):
    import nnunet_mtl.inference.predict as predict_module

    images = tiny_test_crops
    out = tmp_path / "out"
    original = predict_module.infer_case
    calls = []

    def killed_on_second(*args, **kwargs):
        calls.append(args[1].case)  # the case id of the prepared case
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(predict_module, "infer_case", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        predict_folder(tiny_model, images, out, device=CPU, mode=PredictionMode.fast(), progress=False)
    finished = [p.name for p in out.glob("*.nii.gz")]
    assert len(finished) == 1 and not list(out.glob(".*"))  # nothing half-written
    monkeypatch.setattr(predict_module, "infer_case", original)
    report = predict_folder(tiny_model, images, out, device=CPU, mode=PredictionMode.fast(), progress=False)
    assert report.skipped == [calls[0]] and len(report.predicted) == 2
    assert len((out / "subtype_results.csv").read_text().splitlines()) == 1 + 3


def test_an_interrupted_mask_write_leaves_no_mask_and_is_redone(tiny_model, tiny_test_crops, tmp_path, monkeypatch):
    """Killed while nnU-Net writes a mask: no file under the case's name (a reader would take a truncated mask for
    a result), and the next run predicts that case again."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    writer = PlansManager(json.loads((tiny_model / "plans.json").read_text())).image_reader_writer_class
    original = writer.write_seg

    def killed_mid_write(self, segmentation, output_fname, properties):
        Path(output_fname).write_bytes(b"\x1f\x8b\x08 half a mask")  # what a killed process leaves behind
        raise KeyboardInterrupt

    images, out = tiny_test_crops, tmp_path / "out"
    monkeypatch.setattr(writer, "write_seg", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        predict_folder(tiny_model, images, out, device=CPU, mode=PredictionMode.fast(), progress=False)
    assert list(out.glob("quiz_*")) == []  # nothing under a final name
    assert not (out / "subtype_results.csv").exists()
    monkeypatch.setattr(writer, "write_seg", original)
    report = predict_folder(tiny_model, images, out, device=CPU, mode=PredictionMode.fast(), progress=False)
    assert report.skipped == [] and len(report.predicted) == 3
    for image in images.glob("*_0000.nii.gz"):
        assert_same_geometry(out / image.name.replace("_0000", ""), image)
    assert not list(out.glob(".*"))  # the half-written temporary file is gone too


def test_a_corrupt_case_is_reported_and_the_others_predicted(tiny_model, tiny_test_crops, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(tiny_test_crops, images)
    (images / "quiz_950_0000.nii.gz").write_bytes(b"this is not a nifti file")
    write_volume(images / "quiz_951_0000.nii.gz", np.full((8, 16, 16), np.nan, dtype=np.float32))
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
        write_volume(images / "a_0000.nii.gz", np.zeros((4, 8, 8), np.int16))
        out = images / "out"
    code = cli_main(["predict", "-i", str(images), "-o", str(out), "-m", str(tiny_model), "--device", "cpu"])
    assert code == 2
    error = capsys.readouterr().err
    assert {"missing": "does not exist", "empty": "holds no images", "inside": "must not be inside"}[problem] in error
    assert not (tmp_path / "out").exists() or problem == "inside"


def test_stock_nnunet_predictor_uses_our_model_folder(tiny_model, tiny_test_crops, tmp_path):
    """Our results folder stays an nnU-Net results folder: nnU-Net's own predictor (found via nnUNet_extTrainer)
    writes segmentation masks from it. Its sequential entry point: the same model loading, network building and
    prediction as `nnUNetv2_predict`, without the worker pools that cost seconds to spawn here."""
    from nnunet_mtl.cli.train import ext_trainer_path

    out = tmp_path / "stock"
    out.mkdir()  # the sequential entry point writes its arguments there before it creates the folder
    images = tiny_test_crops  # around the gland: whole images tile for a minute
    env = {**os.environ, "nnUNet_extTrainer": ext_trainer_path()}
    code = ("from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor\n"
            "import torch, sys\n"
            "p = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device('cpu'),"
            " allow_tqdm=False)\n"
            "p.initialize_from_trained_model_folder(sys.argv[1], use_folds=(0,))\n"
            "p.predict_from_files_sequential(sys.argv[2], sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", code, str(tiny_model), str(images), str(out)],
                   check=True, env=env, capture_output=True)
    assert len(list(images.glob("*_0000.nii.gz"))) == 3
    for image in images.glob("*_0000.nii.gz"):
        assert_same_geometry(out / image.name.replace("_0000", ""), image)
