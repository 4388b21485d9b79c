"""Postprocessing decided over several cross-validation folds: the stored evidence round-trips, and the pooled
decision is the one the rules give on all folds' cases together, not the last fold's."""

from __future__ import annotations

import json

import numpy as np

from nnunet_mtl.evaluation.lesions import match_case
from nnunet_mtl.inference import lesion_filters, postprocessing
from nnunet_mtl.inference.lesion_candidates import find_candidates
from nnunet_mtl.training.fold_decisions import EVIDENCE_FILE, decide_from_folds, load_evidence, save_evidence

SPACING = (2.0, 1.0, 1.0)  # 0.002 ml per voxel


def case_evidence(name: str, found_score: float, false_score: float | None):
    """A gland with a 0.1 ml true lesion found at ``found_score`` and, optionally, a 0.1 ml false lesion."""
    truth = np.zeros((4, 40, 60), np.uint8)
    truth[:, 2:38, 2:58] = 1
    segmentation, probability = truth.copy(), np.zeros(truth.shape, np.float32)
    truth[1, 5, 5:55] = 2
    segmentation[1, 5, 5:55] = 2
    probability[1, 5, 5:55] = found_score - 0.01
    probability[1, 5, 5] = found_score
    if false_score is not None:
        segmentation[2, 25, 5:55] = 2
        probability[2, 25, 5:55] = false_score - 0.01
        probability[2, 25, 5] = false_score
    _, candidates = find_candidates(segmentation, probability, SPACING)
    lesions = match_case(segmentation, truth, SPACING, name, [(c.peak, c.score) for c in candidates])
    return {False: (lesions, candidates), True: (lesions, candidates)}


def write_folds(model_dir):
    """Fold 1: three near-certain found lesions beside false ones scoring 0.85, and the largest component hurts;
    fold 2 (the last): two found lesions scoring 0.97, and the largest component helps a little."""
    folds = {"1": {f"a{i}": ((0.8, 0.7), case_evidence(f"a{i}", 0.999, 0.85)) for i in range(3)},
             "2": {f"b{i}": ((0.6, 0.62), case_evidence(f"b{i}", 0.97, None)) for i in range(2)}}
    for fold, cases in folds.items():
        folder = model_dir / f"fold_{fold}" / "validation"
        folder.mkdir(parents=True)
        save_evidence(folder, {c: s for c, (s, _) in cases.items()}, {c: e for c, (_, e) in cases.items()})
    return folds


def test_stored_evidence_round_trips(tmp_path):
    folds = write_folds(tmp_path)
    scores, evidence = load_evidence(tmp_path / "fold_1" / "validation")
    assert scores == {c: s for c, (s, _) in folds["1"].items()}
    for case, (_, original) in folds["1"].items():
        assert evidence[case] == original  # dataclasses compare field by field: tuples, floats, nested lesions


def test_decisions_rest_on_every_fold_not_the_last(tmp_path):
    folds = write_folds(tmp_path)
    decided = decide_from_folds(tmp_path, ["1", "2"])
    stored = json.loads((tmp_path / "postprocessing.json").read_text())
    # largest component: the pooled mean says no (0.72 without, 0.668 with); fold 2 alone would say yes
    everything = {c: s for cases in folds.values() for c, (s, _) in cases.items()}
    assert stored["keep_largest_component"] is False
    assert stored["score_without"] == np.mean([s[0] for s in everything.values()])
    assert postprocessing.decide({c: s for c, (s, _) in folds["2"].items()})["keep_largest_component"] is True
    assert stored["cases"] == 5 and stored["folds"] == ["1", "2"]
    # lesion filters: all five found lesions (down to 0.97) allow 0.9, which removes the three false ones at 0.85;
    # fold 2 (the last, whose decision would otherwise stand) finds too few lesions to filter by
    filters = stored["lesion_filters"]
    assert filters["min_probability"] == 0.9 and filters["validation"]["cases"] == 5
    assert filters["validation"]["chosen"]["false_positives"] == 0
    assert filters["validation"]["without_filters"]["false_positives"] == 3
    assert lesion_filters.choose([e[False] for _, e in folds["2"].values()])["description"] == "none"
    assert decided["lesion_filters"]["min_probability"] == 0.9
    assert lesion_filters.read_lesion_filters(tmp_path) == lesion_filters.LesionFilters(0.0, 0.9, False)


def test_a_fold_without_evidence_leaves_the_decision_alone(tmp_path):
    write_folds(tmp_path)
    (tmp_path / "fold_2" / "validation" / EVIDENCE_FILE).unlink()
    assert decide_from_folds(tmp_path, ["1", "2"]) is None
    assert not (tmp_path / "postprocessing.json").exists()


def test_training_several_folds_ends_with_the_pooled_decision(tmp_path, monkeypatch, capsys):
    """train_folds' last step: after the folds (their training stood in for by writing the evidence a validation
    writes) the decision in the model folder is the pooled one, and train_folds returns it."""
    from types import SimpleNamespace

    from nnunet_mtl.training import run, subtype_fit

    folds = write_folds(tmp_path)
    trained = []

    def fake_train(dataset, plans, fold, device, settings, resume, initial_weights, validate, subtype_fit,
                   validation_only):
        trained.append((fold, subtype_fit))
        postprocessing.write_decision(tmp_path, {"keep_largest_component": fold == "2"})  # each fold's own
        return {"model_folder": str(tmp_path)}

    fitted = SimpleNamespace(provenance={"source": "out-of-fold"}, save=lambda folder: None)
    monkeypatch.setattr(run, "train", fake_train)
    monkeypatch.setattr(run, "build_trainer", lambda *a, **k: SimpleNamespace(
        output_folder=str(tmp_path / f"fold_{a[2]}"), subtype_names=["a", "b", "c"]))
    monkeypatch.setattr(subtype_fit, "fit_from_model_folder", lambda *a, **k: fitted)
    result = run.train_folds(1, "demo", ["1", "2"], "cpu")
    assert trained == [("1", "none"), ("2", "none")]  # the classifier is fitted once, out-of-fold
    stored = json.loads((tmp_path / "postprocessing.json").read_text())
    assert stored["keep_largest_component"] is False and stored["cases"] == sum(map(len, folds.values()))
    assert stored["lesion_filters"]["min_probability"] == 0.9
    assert result["postprocessing"]["lesion_filters"]["folds"] == ["1", "2"]
    assert "postprocessing over folds 1, 2 (5 validation cases)" in capsys.readouterr().out
