"""The subtype classifier inside training and prediction: records, fitting, the variants predict writes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from nnunet_mtl.cli import main as cli_main
from nnunet_mtl.inference.outputs import read_details
from nnunet_mtl.inference.predict import InputError, PredictionMode, load_predictor, predict_case
from nnunet_mtl.model.subtype_classifier import LinearSoftmax, SubtypeClassifier, load_classifier, softmax

CPU = torch.device("cpu")


class _BrightIsLesion(torch.nn.Module):
    """Stands in for the network: lesion where the normalised input is above 1, fixed subtype logits."""

    def forward(self, x):
        segmentation = torch.zeros(x.shape[0], 3, *x.shape[2:])
        segmentation[:, 0] = 1.0
        segmentation[:, 1] = 1.5 * (x[:, 0] > 0.3)
        segmentation[:, 2] = 2.0 * (x[:, 0] > 1)
        return segmentation, torch.tensor([[2.0, 0.0, -1.0]]).expand(x.shape[0], 3)

    def attention_from_probabilities(self, probabilities):  # as MultiTaskUNet's single-channel heads
        return probabilities[:, -1:]

    def classify(self, x, lesion_probability=None):  # the encoder-and-head pass of the lesion-centred patch
        return torch.tensor([[2.0, 0.0, -1.0]]).expand(x.shape[0], 3)


def test_training_stored_records_and_a_classifier(tiny_model):
    """Every validation case has a record of the head's logits and every training case a record; the classifier was
    fitted from them (too few cases for a feature model, so the calibrated head) and rests on those cases."""
    records = json.loads((tiny_model / "fold_0" / "subtype_records.json").read_text())
    splits = json.loads((tiny_model.parents[2] / "nnUNet_preprocessed" / tiny_model.parent.name
                         / "splits_final.json").read_text())[0]
    assert sorted(r["case"] for r in records["validation"]) == sorted(splits["val"])
    assert sorted(r["case"] for r in records["train"]) == sorted(splits["train"])
    # 2 / 2 / 3 training cases per subtype (3 / 3 / 4 with the validation fold): fewer than a feature model needs,
    # so no radiomics were computed for either split, and the training cases were not predicted at all
    for record in records["validation"]:
        assert record["features"] is None and len(record["fold_logits"][0]) == 3
    for record in records["train"]:
        assert record["features"] is None and record["fold_logits"] is None
        assert record["subtype"] == int(record["case"].split("_")[1])  # the published names carry the subtype
    logs = "".join(p.read_text() for p in (tiny_model / "fold_0").glob("training_log*"))
    assert "fewer than 5 of some subtype" in logs and "training cases not predicted" in logs
    assert all(len(r["fold_logits"]) == 1 and len(r["fold_logits"][0]) == 3 for r in records["validation"])
    classifier = load_classifier(tiny_model)
    assert classifier is not None and classifier.provenance["heldout_cases"] == len(splits["val"])
    assert classifier.cnn_temperature >= 1.0


def test_predict_writes_the_chosen_variant_and_every_opinion(tiny_model, tiny_dataset, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    feature_model = LinearSoftmax(["lesion.stat_mean"], [0.0], [100.0], [50.0], [[-1.0], [0.0], [1.0]],
                                  [0.0, 0.0, 0.0])
    SubtypeClassifier(["a", "b", "c"], feature_model, cnn_temperature=2.0, feature_temperature=0.5,
                      fusion_weight=0.3, fused_temperature=1.5).save(model)
    predictor = load_predictor(model, device=CPU, mode=PredictionMode.fast())
    predictor.network = _BrightIsLesion()
    predictor.list_of_parameters = [{}]  # one "fold", whose (no) weights the stand-in loads
    image = sorted((tiny_dataset["phantom"] / "test").glob("*_0000.nii.gz"))[0]
    out = tmp_path / "out"
    out.mkdir()
    subtype, _ = predict_case(predictor, image, out, "case")
    assert subtype.lesion_found and subtype.features is not None and subtype.variant == "fused"
    mean = subtype.features["lesion.stat_mean"]
    features = softmax(np.array([-1.0, 0.0, 1.0]) * (mean - 100.0) / 50.0 / 0.5)
    cnn = softmax(np.array([2.0, 0.0, -1.0]) / 2.0)
    fused = softmax((0.3 * np.log(cnn) + 0.7 * np.log(features)) / 1.5)
    assert np.allclose(subtype.variants["cnn"], cnn) and np.allclose(subtype.variants["features"], features)
    assert np.allclose(subtype.probabilities, fused)
    predictor.classifier_variant = "cnn"
    assert np.allclose(predict_case(predictor, image, out, "case")[0].probabilities, cnn)


def test_predict_folder_records_details_and_refuses_a_feature_variant_without_a_feature_model(tiny_model,
                                                                                              tiny_test_crops, tmp_path,
                                                                                              capsys):
    out = tmp_path / "out"
    code = cli_main(["predict", "-i", str(tiny_test_crops), "-o", str(out), "-m", str(tiny_model),
                     "--fast", "--device", "cpu"])
    assert code == 0
    details = read_details(out)
    assert len(details) == len(list((tiny_test_crops).glob("*_0000.nii.gz")))
    for record in details.values():
        assert set(record) >= {"variant", "probabilities", "fold_logits", "lesion_found", "lesion_ml", "features"}
        assert np.isclose(sum(record["probabilities"][record["variant"]]), 1.0)
    if load_classifier(tiny_model).feature_model is None:
        with pytest.raises(InputError, match="no fitted feature classifier"):
            load_predictor(tiny_model, device=CPU, mode=PredictionMode.fast(classifier="features"))


def test_fit_classifier_command_refits_from_the_stored_records(tiny_model, tmp_path, capsys):
    """`nnunet-mtl fit-classifier` rewrites subtype_classifier.json from the fold's records, without predicting:
    the same classifier as fitting the records directly; a folder that is not a model is refused."""
    from nnunet_mtl.training.subtype_fit import fit_from_model_folder

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "subtype_classifier.json").unlink()
    assert cli_main(["fit-classifier", str(model), "--feature-model", "logistic", "--feature-set", "relative"]) == 0
    refitted = load_classifier(model)
    names = json.loads((model / "dataset.json").read_text())["subtype_names"]
    direct = fit_from_model_folder(model, [names[str(i)] for i in range(len(names))], None, "logistic", "relative")
    assert refitted.provenance["feature_set"] == "relative"
    records = json.loads((model / "fold_0" / "subtype_records.json").read_text())
    assert refitted.provenance == direct.provenance
    assert refitted.provenance["heldout_cases"] == len(records["validation"])
    assert refitted.cnn_temperature == pytest.approx(direct.cnn_temperature)
    assert cli_main(["fit-classifier", str(tmp_path)]) == 2
    assert "is not a trained model folder" in capsys.readouterr().err
