"""Calibration on shifted validation cases (training/shift_calibration.py, training/subtype_fit.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from nnunet_mtl.model.subtype_classifier import fit_temperature, nll, softmax
from nnunet_mtl.training.shift_calibration import (
    ACQUISITION_SHIFTS,
    SOFT_TISSUE_BASELINE_HU,
    shift_strength,
    shifted_cases,
)
from nnunet_mtl.training.subtype_fit import fit_classifier, fit_from_model_folder, save_records

PROPERTIES = {"mean": 60.0, "std": 50.0, "percentile_00_5": -150.0, "percentile_99_5": 300.0}
SPACING = (2.0, 1.0, 1.0)


def case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A preprocessed case (normalised, two channels: the CT and a second one left alone) and its HU."""
    rng = np.random.default_rng(seed)
    hu = rng.uniform(-100.0, 250.0, (8, 12, 12)).astype(np.float32)
    data = np.stack([(hu - PROPERTIES["mean"]) / PROPERTIES["std"], rng.normal(size=hu.shape).astype(np.float32)])
    return data, hu


def shifted_hu(case_index: int = 0) -> dict[str, np.ndarray]:
    data, _ = case()
    out = {}
    for name, shifted in shifted_cases(data, SPACING, PROPERTIES, "CTNormalization", case_index):
        assert np.array_equal(shifted[1], data[1])  # only the CT channel moves
        out[name] = shifted[0] * PROPERTIES["std"] + PROPERTIES["mean"]
    return out


def expected_clip(hu: np.ndarray) -> np.ndarray:
    return np.clip(hu, PROPERTIES["percentile_00_5"], PROPERTIES["percentile_99_5"])


def test_every_kind_is_shifted_once_at_the_strength_the_alternation_gives():
    for index in (0, 1):
        names = list(shifted_hu(index))
        assert [n.split("@")[0] for n in names] == list(ACQUISITION_SHIFTS)
        assert [float(n.split("@")[1]) for n in names] == [shift_strength(index, k) for k in range(len(names))]
    strengths = [[shift_strength(i, k) for k in range(len(ACQUISITION_SHIFTS))] for i in range(4)]
    assert all(row.count(1.0) == row.count(2.0) for row in strengths)  # half moderate, half strong per case
    assert strengths[0] != strengths[1]  # and the next case the other way round


def test_shifts_do_to_the_hu_what_they_say():
    _, hu = case()
    got = {name.split("@")[0]: (float(name.split("@")[1]), image) for name, image in shifted_hu(0).items()}
    s, image = got["hu_offset_up"]
    assert np.allclose(image, expected_clip(hu + 15.0 * s), atol=1e-3)
    s, image = got["hu_offset_down"]
    assert np.allclose(image, expected_clip(hu - 15.0 * s), atol=1e-3)
    s, image = got["late_phase"]
    enhancement = np.clip(hu - SOFT_TISSUE_BASELINE_HU, 0.0, None)
    assert np.allclose(image, expected_clip(hu - 0.25 * s * enhancement), atol=1e-3)
    below = hu <= SOFT_TISSUE_BASELINE_HU
    assert np.allclose(image[below], expected_clip(hu)[below], atol=1e-3)  # unenhanced tissue stays
    s, image = got["thick_slices"]
    width = int(round(3.0 * s / SPACING[0]))
    assert width >= 2
    inner = range(width // 2, hu.shape[0] - width + width // 2 + 1)  # slices whose slab lies inside the volume
    slab = np.stack([hu[z - width // 2: z - width // 2 + width].mean(0) for z in inner])
    assert np.allclose(image[list(inner)], expected_clip(slab), atol=1e-2)  # a moving mean of `width` slices
    s, image = got["smooth_kernel"]
    sigma = 1.0 * s / 2.355
    assert np.allclose(image, expected_clip(ndimage.gaussian_filter(hu, [0, sigma, sigma], mode="nearest")),
                       atol=1e-2)
    assert image[:, 1:-1, 1:-1].std() < hu[:, 1:-1, 1:-1].std()
    s, image = got["sharp_kernel"]
    inside = (hu > -120) & (hu < 270)  # away from the clip
    assert np.std((image - hu)[inside]) == pytest.approx(15.0 * s, rel=0.15)
    for image in (v[1] for v in got.values()):
        assert image.min() >= PROPERTIES["percentile_00_5"] - 1e-3
        assert image.max() <= PROPERTIES["percentile_99_5"] + 1e-3


def test_the_noise_is_the_same_on_a_second_call_and_differs_between_cases():
    first, again, other = shifted_hu(0), shifted_hu(0), shifted_hu(2)
    name = next(n for n in first if n.startswith("sharp_kernel"))
    assert np.array_equal(first[name], again[name])
    assert not np.array_equal(first[name], other[next(n for n in other if n.startswith("sharp_kernel"))])


def test_a_channel_that_is_not_ct_normalised_is_not_shifted():
    data, _ = case()
    assert list(shifted_cases(data, SPACING, PROPERTIES, "ZScoreNormalization")) == []
    assert list(shifted_cases(data, SPACING, None, "CTNormalization")) == []


def head_records(n: int, confidence: float, right: float, seed: int, shift: str | None = None) -> list[dict]:
    """Cases whose head answers at logit margin ``confidence`` and is right in a share ``right`` of them."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = i % 3
        answer = k if rng.random() < right else (k + 1) % 3
        record = {"case": f"c{i}", "subtype": k, "fold_logits": [(confidence * np.eye(3)[answer]).tolist()],
                  "features": None}
        out.append({**record, "shift": shift} if shift else record)
    return out


def test_shifted_copies_where_the_head_errs_raise_its_temperature_and_lower_the_nll_on_shifted_data():
    """The constructed over-confident case: all 12 validation cases right at a margin of 8 (temperature 1, the
    floor), their shifted copies right only in 70 %. With the copies the temperature rises, and on new data that is
    as shifted the NLL falls."""
    names = ["a", "b", "c"]
    clean = head_records(12, 8.0, 1.0, 0)
    shifted = head_records(96, 8.0, 0.7, 1, shift="late_phase@2")
    alone = fit_classifier([], clean, names)
    calibrated = fit_classifier([], clean, names, shifted=shifted)
    assert alone.cnn_temperature == pytest.approx(1.0, abs=1e-3)
    assert calibrated.cnn_temperature > 2.0
    logits = np.vstack([np.vstack([_logits(r) for r in clean]), np.vstack([_logits(r) for r in shifted])])
    y = np.array([r["subtype"] for r in clean + shifted])
    assert calibrated.cnn_temperature == pytest.approx(fit_temperature(logits, y, minimum=1.0), rel=1e-6)
    new = head_records(300, 8.0, 0.7, 2)
    new_logits, new_y = np.vstack([_logits(r) for r in new]), np.array([r["subtype"] for r in new])
    assert nll(new_logits / calibrated.cnn_temperature, new_y) < 0.5 * nll(new_logits / alone.cnn_temperature, new_y)
    assert calibrated.provenance["cnn_temperature_shifted_cases"] == 96
    assert calibrated.provenance["shifts"] == ["late_phase@2"]
    assert calibrated.validation["cnn_shifted_raw"]["accuracy"] == pytest.approx(
        np.mean([np.argmax(r["fold_logits"][0]) == r["subtype"] for r in shifted]))
    assert softmax(new_logits / calibrated.cnn_temperature).max(1).mean() < 0.9


def _logits(record: dict) -> np.ndarray:
    return np.mean(np.asarray(record["fold_logits"], float), axis=0)


def test_the_model_folder_fit_uses_the_shifted_records_unless_told_not_to(tmp_path):
    fold = tmp_path / "fold_0"
    fold.mkdir()
    names = ["a", "b", "c"]
    clean, shifted = head_records(12, 8.0, 1.0, 0), head_records(96, 8.0, 0.7, 1, shift="thick_slices@1")
    save_records(fold, "train", head_records(30, 8.0, 1.0, 3))
    save_records(fold, "validation", clean)
    save_records(fold, "validation_shifted", shifted)
    used = fit_from_model_folder(tmp_path, names)
    assert used.cnn_temperature == pytest.approx(fit_classifier([], clean, names, shifted=shifted).cnn_temperature)
    assert used.cnn_temperature > 2.0
    ignored = fit_from_model_folder(tmp_path, names, shift_calibration=False)
    assert ignored.cnn_temperature == pytest.approx(1.0, abs=1e-3)
    assert "cnn_temperature_shifted_cases" not in ignored.provenance
