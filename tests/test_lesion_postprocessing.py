"""Lesion candidates (scores per predicted component), the false-lesion filters, their choice on validation cases,
and what predict writes: checked against flood-fill components and direct computations on the arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_lesions import flood_components

from nnunet_mtl.evaluation.evaluate import evaluate_folder
from nnunet_mtl.evaluation.lesions import label_components, match_case
from nnunet_mtl.inference import lesion_filters, postprocessing
from nnunet_mtl.inference.lesion_candidates import (
    CANDIDATES_CSV,
    find_candidates,
    lesion_facts,
    read_candidates_table,
    write_candidates_table,
)
from nnunet_mtl.inference.lesion_filters import NO_FILTERS, LesionFilters, choose, read_lesion_filters

SPACING = (2.0, 1.0, 1.0)  # 0.002 ml per voxel
CPU = torch.device("cpu")


def random_prediction(rng: np.random.Generator, shape=(8, 20, 20)) -> tuple[np.ndarray, np.ndarray]:
    """A gland with lesion blobs inside and outside it, and a lesion probability map."""
    segmentation = np.zeros(shape, np.uint8)
    segmentation[2:6, 4:14, 4:14] = 1
    segmentation[3:5, 15:19, 15:19] = 1  # a second, smaller foreground component
    lesion = rng.random(shape) < 0.08
    segmentation[lesion] = 2
    probability = rng.uniform(0.0, 1.0, shape).astype(np.float32)
    return segmentation, probability


def test_candidates_match_flood_fill_components():
    rng = np.random.default_rng(0)
    for _ in range(10):
        segmentation, probability = random_prediction(rng)
        labels, candidates = find_candidates(segmentation, probability, SPACING)
        components = flood_components(segmentation == 2)
        foreground = max(flood_components(segmentation > 0), key=len)
        assert len(candidates) == len(components)
        by_size = sorted(candidates, key=lambda c: (c.voxels, c.max_probability))
        expected = sorted(components, key=lambda c: (len(c), max(probability[v] for v in c)))
        for candidate, component in zip(by_size, expected):
            values = [probability[v] for v in component]
            assert candidate.voxels == len(component) and candidate.volume_ml == pytest.approx(len(component) * 0.002)
            assert candidate.max_probability == pytest.approx(max(values))
            assert candidate.mean_probability == pytest.approx(np.mean(values), rel=1e-5)
            assert candidate.peak in component and probability[candidate.peak] == max(values)
            assert candidate.in_gland == (component <= foreground)
            assert {tuple(v) for v in np.argwhere(labels == candidate.component)} == component


def test_candidates_table_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    table = {}
    for case in ("quiz_001", "quiz_002"):
        segmentation, probability = random_prediction(rng)
        table[case] = find_candidates(segmentation, probability, SPACING)[1]
    table["quiz_003"] = []  # no lesion: no rows
    write_candidates_table(tmp_path, table)
    read = read_candidates_table(tmp_path / CANDIDATES_CSV)
    assert set(read) == {"quiz_001", "quiz_002"}
    for case in read:
        for a, b in zip(read[case], table[case]):
            assert (a.component, a.voxels, a.peak, a.in_gland) == (b.component, b.voxels, b.peak, b.in_gland)
            assert a.max_probability == pytest.approx(b.max_probability, abs=1e-6)
    lines = (tmp_path / CANDIDATES_CSV).read_text().splitlines()
    (tmp_path / CANDIDATES_CSV).write_text("\n".join([lines[0], lines[1].replace(",1\n", ",x") + ",extra"]))
    with pytest.raises(ValueError, match="line 2"):
        read_candidates_table(tmp_path / CANDIDATES_CSV)
    assert lesion_facts([]) == {"lesion_found": 0, "lesion_volume_ml": 0.0, "lesion_probability": 0.0}
    facts = lesion_facts(table["quiz_001"])
    assert facts["lesion_found"] == 1
    assert facts["lesion_volume_ml"] == pytest.approx(sum(c.volume_ml for c in table["quiz_001"]), abs=1e-4)


def test_filters_remove_whole_components_into_gland_or_background():
    rng = np.random.default_rng(2)
    segmentation, probability = random_prediction(rng)
    labels, candidates = find_candidates(segmentation, probability, SPACING)
    filters = LesionFilters(min_volume_ml=0.005, min_probability=0.5, drop_outside_gland=True)
    filtered, kept = lesion_filters.apply(segmentation, labels, candidates, filters)
    for c in candidates:
        voxels = labels == c.component
        expected = 2 if (c.voxels >= 3 and c.max_probability >= 0.5 and c.in_gland) else 1 if c.in_gland else 0
        assert np.all(filtered[voxels] == expected)
    assert np.array_equal(filtered[labels == 0], segmentation[labels == 0])  # nothing else changes
    # the kept candidates describe the filtered mask, numbered as its own components
    new_labels, n = label_components(filtered == 2)
    assert n == len(kept) and [c.component for c in kept] == list(range(1, n + 1))
    assert all(new_labels[c.peak] == c.component for c in kept)
    assert lesion_filters.apply(segmentation, labels, candidates, NO_FILTERS)[0] is segmentation


def blob(array: np.ndarray, probability: np.ndarray, z: int, y: int, x: int, voxels: int, score: float,
         label: int = 2) -> None:
    """``voxels`` voxels in a row along x (one component), probability ``score`` at its first voxel."""
    array[z, y, x:x + voxels] = label
    probability[z, y, x:x + voxels] = score - 0.01
    probability[z, y, x] = score


def test_choice_on_validation_cases_keeps_every_found_lesion_with_a_margin(monkeypatch):
    from nnunet_mtl.evaluation.metrics import dice

    cases, arrays = [], []
    for case in ("a", "b"):
        truth = np.zeros((4, 40, 60), np.uint8)
        truth[:, 2:38, 2:58] = 1
        segmentation, probability = truth.copy(), np.zeros(truth.shape, np.float32)
        if case == "a":
            blob(truth, np.zeros_like(probability), 1, 5, 5, 50, 0)  # a 0.1 ml lesion ...
            blob(segmentation, probability, 1, 5, 5, 45, 0.95)  # ... found, confidently
            blob(segmentation, probability, 2, 20, 5, 2, 0.9)  # false: 0.004 ml but confident
        else:
            blob(truth, np.zeros_like(probability), 1, 5, 5, 30, 0)  # 0.06 ml lesion ...
            blob(segmentation, probability, 1, 5, 5, 30, 0.62)  # ... found, score 0.62
            blob(segmentation, probability, 2, 20, 5, 20, 0.45)  # false: 0.04 ml, faint
            blob(segmentation, probability, 2, 30, 5, 20, 0.58)  # false: 0.04 ml, 0.58
        labels, candidates = find_candidates(segmentation, probability, SPACING)
        cases.append((match_case(segmentation, truth, SPACING, case, [(c.peak, c.score) for c in candidates]),
                      candidates))
        arrays.append((segmentation, labels, candidates, truth))
    monkeypatch.setattr(lesion_filters, "MIN_FOUND_LESIONS", 2)
    decision = choose(cases)
    # 0.005 ml removes the speck, probability 0.5 the faint one; 0.6 would also remove the 0.58 one but leaves
    # lesion b (0.62) within the 0.05 margin, and 0.05 ml would leave the 0.06 ml lesion within twice the minimum
    assert (decision["min_volume_ml"], decision["min_probability"], decision["drop_outside_gland"]) == \
        (0.005, 0.5, False)
    assert decision["validation"]["without_filters"]["false_positives"] == 3
    assert decision["validation"]["chosen"]["false_positives"] == 1
    assert decision["validation"]["chosen"]["detected"] == 2
    row = next(r for r in decision["grid"] if r["filters"] == {"min_volume_ml": 0.005, "min_probability": 0.6,
                                                               "drop_outside_gland": False})
    assert row["false_positives"] == 0 and row["detected"] == 2 and not row["admissible"]
    # the mean case lesion Dice after filtering equals Dice computed on the filtered masks
    for filters, result in ((LesionFilters(0.005, 0.5), decision["validation"]["chosen"]),
                            (NO_FILTERS, decision["validation"]["without_filters"])):
        direct = [dice(lesion_filters.apply(s, labels, c, filters)[0] == 2, truth == 2)
                  for s, labels, c, truth in arrays]
        assert result["mean_case_lesion_dice"] == pytest.approx(np.mean(direct))
    assert decision["validation"]["chosen"]["mean_case_lesion_dice"] > \
        decision["validation"]["without_filters"]["mean_case_lesion_dice"]
    # with only these two found lesions (fewer than MIN_FOUND_LESIONS) a fold shows too little to filter by
    with monkeypatch.context() as m:
        m.setattr(lesion_filters, "MIN_FOUND_LESIONS", 3)
        assert choose(cases)["description"] == "none"


def test_decision_lives_beside_the_largest_component_one(tmp_path):
    assert read_lesion_filters(tmp_path) == NO_FILTERS  # never decided: no filters
    postprocessing.write_decision(tmp_path, {"keep_largest_component": True})
    assert read_lesion_filters(tmp_path) == NO_FILTERS
    lesion_filters.write_decision(tmp_path, {"min_volume_ml": 0.01, "min_probability": 0.7,
                                             "drop_outside_gland": False, "description": "x"})
    assert read_lesion_filters(tmp_path) == LesionFilters(0.01, 0.7, False)
    assert postprocessing.read_decision(tmp_path) is True  # the largest-component decision is kept
    assert json.loads((tmp_path / "postprocessing.json").read_text())["keep_largest_component"] is True


# ------------------------------------------------------------------------------------- predict end to end

class _BrightIsLesion(torch.nn.Module):
    """Stands in for the network: soft tissue is pancreas, bright voxels are lesion with a graded confidence."""

    def forward(self, x):
        segmentation = torch.zeros(x.shape[0], 3, *x.shape[2:])
        segmentation[:, 0] = 1.0
        segmentation[:, 1] = 1.5 * (x[:, 0] > 0)
        segmentation[:, 2] = 1.2 * x[:, 0]
        return segmentation, torch.tensor([[0.0, 1.0, 0.0]])

    def attention_from_probabilities(self, probabilities):  # as MultiTaskUNet's single-channel heads
        return probabilities[:, -1:]

    def classify(self, x, lesion_probability=None):  # the encoder-and-head pass of the lesion-centred patch
        return torch.tensor([[0.0, 1.0, 0.0]]).expand(x.shape[0], 3)


@pytest.fixture()
def fake_network(monkeypatch):
    import nnunet_mtl.inference.predict as predict_module

    original = predict_module.load_predictor

    def load(*args, **kwargs):
        predictor = original(*args, **kwargs)
        predictor.network = _BrightIsLesion()
        predictor.list_of_parameters = [{}]  # the fold loop loads each fold's weights: the stand-in has none
        return predictor

    monkeypatch.setattr(predict_module, "load_predictor", load)


def read_mask(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_predict_records_every_lesion_component_and_the_case_facts(tiny_model, tiny_dataset, tmp_path,
                                                                   fake_network):
    from nnunet_mtl.inference.predict import PredictionMode, predict_folder

    images = tiny_dataset["phantom"] / "test"
    out = tmp_path / "out"
    predict_folder(tiny_model, images, out, device=CPU, mode=PredictionMode.fast(lesion_filters=NO_FILTERS),
                   progress=False)
    table = read_candidates_table(out / CANDIDATES_CSV)
    lines = (out / "subtype_probabilities.csv").read_text().splitlines()
    assert lines[0] == "Names,Subtype,prob_0,prob_1,prob_2,lesion_found,lesion_volume_ml,lesion_probability"
    assert (out / "subtype_results.csv").read_text().splitlines()[0] == "Names,Subtype"
    facts = {row.split(",")[0].removesuffix(".nii.gz"): row.split(",")[5:] for row in lines[1:]}
    volumes = []
    for mask in sorted(out.glob("quiz_*.nii.gz")):
        case = mask.name.removesuffix(".nii.gz")
        image = sitk.ReadImage(str(mask))
        labels = read_mask(mask)
        components = flood_components(labels == 2)
        rows = table.get(case, [])
        assert sorted(c.voxels for c in rows) == sorted(len(c) for c in components)
        assert all(labels[c.peak] == 2 and 1 / 3 < c.max_probability <= 1 for c in rows)
        voxel_ml = np.prod(image.GetSpacing()) / 1000
        assert int(facts[case][0]) == int(bool(components))
        assert float(facts[case][1]) == pytest.approx((labels == 2).sum() * voxel_ml, abs=1e-4)
        volumes += [c.volume_ml for c in rows]
    assert len(volumes) >= 3  # bright voxels make several lesions: the checks above are not vacuous

    summary = evaluate_folder(out, tiny_dataset["phantom"] / "test_groundtruth")
    assert summary["lesions"]["froc"] is not None and summary["lesions"]["n_predicted"] == len(volumes)

    # filters given on the command line's behalf: components under a volume between two of those seen go
    sizes = sorted(set(volumes))
    cut = (sizes[len(sizes) // 2 - 1] + sizes[len(sizes) // 2]) / 2
    filtered = tmp_path / "filtered"
    predict_folder(tiny_model, images, filtered, device=CPU,
                   mode=PredictionMode.fast(lesion_filters=LesionFilters(min_volume_ml=cut)), progress=False)
    kept = read_candidates_table(filtered / CANDIDATES_CSV)
    assert sum(len(v) for v in kept.values()) == sum(v >= cut for v in volumes)
    for mask in filtered.glob("quiz_*.nii.gz"):
        before, after = read_mask(out / mask.name), read_mask(mask)
        assert np.array_equal(before > 0, after > 0) or not np.array_equal(before, after)
        assert sorted(len(c) for c in flood_components(after == 2)) == \
            sorted(c.voxels for c in kept.get(mask.name.removesuffix(".nii.gz"), []))


def test_a_folder_without_candidates_is_predicted_again(tiny_model, tiny_test_crops, tmp_path):
    from nnunet_mtl.inference.predict import PredictionMode, predict_folder

    images = tiny_test_crops
    out = tmp_path / "out"
    first = predict_folder(tiny_model, images, out, device=CPU, mode=PredictionMode.fast(), progress=False)
    again = predict_folder(tiny_model, images, out, device=CPU, mode=PredictionMode.fast(), progress=False)
    assert len(first.predicted) == 3 and again.skipped == first.predicted
    (out / CANDIDATES_CSV).unlink()  # as an older version left it: the lesion components were never recorded
    third = predict_folder(tiny_model, images, out, device=CPU, mode=PredictionMode.fast(), progress=False)
    assert third.skipped == [] and len(third.predicted) == 3 and (out / CANDIDATES_CSV).is_file()


def test_cli_lesion_filter_options(tiny_model, tmp_path, capsys):
    from nnunet_mtl.cli import main as cli_main

    code = cli_main(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", str(tiny_model),
                     "--min-lesion-probability", "1.5"])
    assert code == 2 and "--min-lesion-probability" in capsys.readouterr().err


def test_choice_reaches_the_strict_end_of_the_grid_only_when_found_lesions_are_near_certain(monkeypatch):
    """0.95 and 0.98 take half the distance to 1 as margin: found lesions must score 0.975 and 0.99."""
    monkeypatch.setattr(lesion_filters, "MIN_FOUND_LESIONS", 1)

    def fold(found_score: float) -> list:
        truth = np.zeros((4, 40, 60), np.uint8)
        truth[:, 2:38, 2:58] = 1
        segmentation, probability = truth.copy(), np.zeros(truth.shape, np.float32)
        blob(truth, np.zeros_like(probability), 1, 5, 5, 50, 0)  # a 0.1 ml lesion ...
        blob(segmentation, probability, 1, 5, 5, 50, found_score)  # ... found with this score
        blob(segmentation, probability, 2, 20, 5, 50, 0.94)  # false lesions as large, confident
        blob(segmentation, probability, 2, 30, 5, 50, 0.97)
        labels, candidates = find_candidates(segmentation, probability, SPACING)
        return [(match_case(segmentation, truth, SPACING, "a", [(c.peak, c.score) for c in candidates]), candidates)]

    assert LesionFilters(0, 0.98).keeps(find_candidates(*_one_blob(0.99), SPACING)[1][0], 1.0, 0.05)
    assert not LesionFilters(0, 0.98).keeps(find_candidates(*_one_blob(0.985), SPACING)[1][0], 1.0, 0.05)
    assert LesionFilters(0, 0.5).keeps(find_candidates(*_one_blob(0.55), SPACING)[1][0], 1.0, 0.05)  # as before
    assert not LesionFilters(0, 0.5).keeps(find_candidates(*_one_blob(0.54), SPACING)[1][0], 1.0, 0.05)
    for found, chosen, false in ((0.995, 0.98, 0), (0.985, 0.95, 1), (0.96, 0.0, 2)):  # 0.9 removes nothing
        decision = choose(fold(found))
        assert (decision["min_probability"], decision["validation"]["chosen"]["false_positives"]) == (chosen, false)
        assert decision["validation"]["chosen"]["detected"] == 1


def test_a_saturated_network_gets_the_strict_end_of_the_grid_only_with_its_found_lesions_above_it(monkeypatch):
    """Longer-trained networks give false lesions 0.99+; 0.995 and 0.999 are chosen only when every found lesion
    scores above them by half the distance to 1 (0.9975 and 0.9995)."""
    monkeypatch.setattr(lesion_filters, "MIN_FOUND_LESIONS", 1)

    def fold(found_score: float) -> list:
        truth = np.zeros((4, 40, 60), np.uint8)
        truth[:, 2:38, 2:58] = 1
        segmentation, probability = truth.copy(), np.zeros(truth.shape, np.float32)
        blob(truth, np.zeros_like(probability), 1, 5, 5, 50, 0)
        blob(segmentation, probability, 1, 5, 5, 50, found_score)
        blob(segmentation, probability, 2, 20, 5, 50, 0.993)  # confident false lesions
        blob(segmentation, probability, 2, 30, 5, 50, 0.9985)
        labels, candidates = find_candidates(segmentation, probability, SPACING)
        return [(match_case(segmentation, truth, SPACING, "a", [(c.peak, c.score) for c in candidates]), candidates)]

    for found, chosen, false in ((0.99995, 0.999, 0), (0.999, 0.995, 1), (0.996, 0.0, 2)):
        decision = choose(fold(found))
        assert (decision["min_probability"], decision["validation"]["chosen"]["false_positives"]) == (chosen, false)
        assert decision["validation"]["chosen"]["detected"] == 1


def _one_blob(score: float) -> tuple[np.ndarray, np.ndarray]:
    segmentation, probability = np.zeros((4, 40, 60), np.uint8), np.zeros((4, 40, 60), np.float32)
    blob(segmentation, probability, 1, 5, 5, 50, score)
    return segmentation, probability
