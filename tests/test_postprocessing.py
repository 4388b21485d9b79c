"""Largest-component postprocessing: the step itself on hand-made masks, the decision on validation cases, the
decision file, and `predict --largest-component yes|no|auto`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from volumes import read_array, write_volume

from nnunet_mtl.cli import main as cli_main
from nnunet_mtl.inference import postprocessing
from nnunet_mtl.inference.postprocessing import POSTPROCESSING_FILE, determine, keep_largest_component

SHAPE = (10, 20, 20)


def gland() -> np.ndarray:
    """A 4 x 8 x 8 gland (256 voxels) holding an 18-voxel lesion."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:6, 2:10, 2:10] = 1
    labels[3:5, 4:7, 4:7] = 2
    return labels


def blob(labels: np.ndarray, value: int = 1) -> np.ndarray:
    """The same labels plus a 32-voxel component away from the gland."""
    labels = labels.copy()
    labels[7:9, 14:18, 14:18] = value
    return labels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if not a.any() and not b.any() else 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_keep_largest_component_removes_every_label_outside_the_gland():
    labels = gland()
    labels[6, 10, 10] = 1  # touches the gland's corner voxel (5, 9, 9) only diagonally: 26-connected, kept
    expected = labels.copy()
    labels = blob(labels, value=2)  # a false lesion away from the gland
    labels[2:4, 15:19, 2:5] = 1  # and a false pancreas blob
    kept = keep_largest_component(labels)
    assert np.array_equal(kept, expected)
    assert keep_largest_component(np.zeros(SHAPE, np.uint8)).sum() == 0
    assert np.array_equal(keep_largest_component(gland()), gland())


def write_cases(folder: Path, cases: dict[str, np.ndarray]) -> list[str]:
    for case, labels in cases.items():
        write_volume(folder / f"{case}.nii.gz", labels, spacing=(0.8, 0.8, 2.0))
    return sorted(cases)


@pytest.mark.parametrize("cases, keep", [
    ({"a": "false blob"}, True),  # the blob costs whole-pancreas Dice: 2 x 256 / (256 + 288) = 16/17
    ({"b": "split gland"}, False),  # the truth itself has two parts: keeping one costs 16/17
    ({"a": "false blob", "b": "split gland"}, False),  # equal means: no change without a gain
])
def test_the_decision_follows_the_mean_of_whole_pancreas_and_lesion_dice(tmp_path, cases, keep):
    truths = {"false blob": gland(), "split gland": blob(gland())}
    predictions = {"false blob": blob(gland()), "split gland": blob(gland())}
    names = write_cases(tmp_path / "truth", {c: truths[kind] for c, kind in cases.items()})
    write_cases(tmp_path / "pred", {c: predictions[kind] for c, kind in cases.items()})
    decision = determine(tmp_path / "pred", tmp_path / "truth", names)
    score = {"false blob": ((16 / 17 + 1) / 2, 1.0), "split gland": (1.0, (16 / 17 + 1) / 2)}  # (without, with)
    assert decision["score_without"] == pytest.approx(np.mean([score[k][0] for k in cases.values()]))
    assert decision["score_with"] == pytest.approx(np.mean([score[k][1] for k in cases.values()]))
    assert decision["keep_largest_component"] is keep and decision["cases"] == len(cases)
    # the scores are the task's numbers, computed here independently
    for kind in cases.values():
        pred, truth = predictions[kind], truths[kind]
        assert score[kind][0] == pytest.approx((dice(pred > 0, truth > 0) + dice(pred == 2, truth == 2)) / 2)


def test_decision_file_round_trip(tmp_path):
    assert postprocessing.read_decision(tmp_path) is False  # never decided: no postprocessing
    postprocessing.write_decision(tmp_path, {"keep_largest_component": True, "score_with": 0.9})
    assert postprocessing.read_decision(tmp_path) is True
    assert [p.name for p in tmp_path.iterdir()] == [POSTPROCESSING_FILE]  # no temporary file left


def test_training_decided_on_its_validation_fold(tiny_model, tiny_dataset):
    """The tiny model's postprocessing.json holds the decision its validation masks support."""
    decision = json.loads((tiny_model / POSTPROCESSING_FILE).read_text())
    validation = tiny_model / "fold_0" / "validation"
    cases = sorted(p.name.removesuffix(".nii.gz") for p in validation.glob("*.nii.gz"))
    assert decision["cases"] == len(cases) == 3
    scores, largest_only = [], []
    for case in cases:
        pred = read_array(validation / f"{case}.nii.gz")
        truth = read_array(tiny_dataset["raw"] / "labelsTr" / f"{case}.nii.gz")
        components, n = ndimage.label(pred > 0, np.ones((3, 3, 3)))
        largest = pred * (components == np.argmax(np.bincount(components.ravel())[1:]) + 1) if n else pred
        for masks, target in ((pred, scores), (largest, largest_only)):
            target.append((dice(masks > 0, truth > 0) + dice(masks == 2, truth == 2)) / 2)
    if decision["keep_largest_component"]:  # the validation masks were postprocessed already
        assert decision["score_with"] == pytest.approx(np.mean(scores))
        assert np.array_equal(largest_only, scores)
        assert decision["score_with"] > decision["score_without"]
    else:
        assert decision["score_without"] == pytest.approx(np.mean(scores))
        assert decision["score_with"] == pytest.approx(np.mean(largest_only))
        assert decision["score_with"] <= decision["score_without"]


def scripted_segmentation(monkeypatch) -> dict:
    """nnU-Net's export returns a hand-made mask of the image's shape: a gland with its lesion and a blob apart."""
    import nnunetv2.inference.export_prediction as export

    original = export.convert_predicted_logits_to_segmentation_with_correct_shape
    made = {}

    def convert(*args, **kwargs):
        result = original(*args, **kwargs)
        shape = np.asarray(result[0] if kwargs.get("return_probabilities") else result).shape
        labels = np.zeros(shape, np.uint8)
        labels[1:shape[0] // 2, 1:shape[1] // 2, 1:shape[2] // 2] = 1
        labels[2:4, 2:5, 2:5] = 2
        labels[-3:-1, -4:-1, -4:-1] = 1
        made["with_blob"] = labels
        made["gland_only"] = labels.copy()
        made["gland_only"][-3:-1, -4:-1, -4:-1] = 0
        if kwargs.get("return_probabilities"):  # predict scores lesion components on the class probabilities
            return labels, np.stack([labels == k for k in range(3)]).astype(np.float32)
        return labels

    monkeypatch.setattr(export, "convert_predicted_logits_to_segmentation_with_correct_shape", convert)
    return made


@pytest.mark.parametrize("choice, decided, kept", [
    ("yes", None, "gland_only"), ("no", True, "with_blob"),
    ("auto", True, "gland_only"), ("auto", False, "with_blob"), ("auto", None, "with_blob"),
])
def test_predict_applies_the_largest_component_as_asked(tiny_model, tiny_dataset, tmp_path, monkeypatch, choice,
                                                        decided, kept):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("validation"))
    (model / POSTPROCESSING_FILE).unlink(missing_ok=True)
    if decided is not None:
        (model / POSTPROCESSING_FILE).write_text(json.dumps({"keep_largest_component": decided}))
    images = tmp_path / "images"
    images.mkdir()
    image = sorted((tiny_dataset["phantom"] / "test").glob("*_0000.nii.gz"))[0]
    shutil.copy(image, images / image.name)
    made = scripted_segmentation(monkeypatch)
    out = tmp_path / "out"
    assert cli_main(["predict", "-i", str(images), "-o", str(out), "-m", str(model), "--fast", "--device", "cpu",
                     "--largest-component", choice]) == 0
    written = read_array(out / image.name.replace("_0000", ""))
    assert np.array_equal(written, made[kept])
