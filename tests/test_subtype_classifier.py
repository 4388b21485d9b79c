"""The subtype classifier: lesion features, the linear feature model, calibration and fusion."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nnunet_mtl.model.lesion_features import (
    image_in_hu,
    lesion_features,
    relative_features,
    select_lesion,
    shell_around,
)
from nnunet_mtl.model.subtype_classifier import (
    SubtypeClassifier,
    fit_linear,
    fit_temperature,
    load_classifier,
    nll,
    softmax,
)
from nnunet_mtl.training.subtype_fit import fit_classifier, fit_from_model_folder, save_records

SPACING = (2.0, 1.0, 1.0)


def ball(shape, centre, radius_mm, spacing=SPACING):
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing)) <= radius_mm ** 2


def gland_with_lesion(seed: int, lesion_hu: float, parenchyma_hu: float = 100.0):
    """A ball of 'pancreas' (label 1, ~parenchyma_hu) holding a ball of lesion (label 2, ~lesion_hu), in fat."""
    rng = np.random.default_rng(seed)
    shape = (16, 40, 40)
    labels = np.zeros(shape, np.uint8)
    labels[ball(shape, (8, 20, 20), 14.0)] = 1
    labels[ball(shape, (8, 20, 20), 5.0)] = 2
    image = np.full(shape, -100.0) + rng.normal(0, 5, shape)
    image[labels == 1] = parenchyma_hu + rng.normal(0, 8, int((labels == 1).sum()))
    image[labels == 2] = lesion_hu + rng.normal(0, 8, int((labels == 2).sum()))
    return image.astype(np.float32), labels


# ------------------------------------------------------------------------------------------------ features


def test_first_order_features_equal_an_independent_computation():
    image, labels = gland_with_lesion(0, lesion_hu=30.0)
    labels[1:3, 2:5, 2:5] = 2  # a false lesion outside the gland: not the one described
    features = lesion_features(image, labels, SPACING)
    lesion = select_lesion(labels)
    values = np.rint(image[lesion]).astype(float)  # MIRP rounds CT to whole HU, as the IBSI does
    assert lesion.sum() == int(ball(labels.shape, (8, 20, 20), 5.0).sum())
    assert features["lesion.stat_mean"] == pytest.approx(values.mean(), abs=1e-3)
    assert features["lesion.stat_var"] == pytest.approx(values.var(), rel=1e-4)  # IBSI: population variance
    assert features["lesion.stat_median"] == pytest.approx(np.median(values), abs=1e-3)
    assert features["lesion.stat_min"] == pytest.approx(values.min(), abs=1e-3)
    shell = shell_around(lesion, labels, SPACING)
    shell_mean = np.rint(image[shell]).astype(float).mean()
    assert features["shell.stat_mean"] == pytest.approx(shell_mean, abs=1e-3)
    assert features["contrast.stat_mean"] == pytest.approx(values.mean() - shell_mean, abs=1e-3)
    assert features["lesion.log_volume_ml"] == pytest.approx(np.log(lesion.sum() * 2.0 / 1000), abs=1e-9)
    assert any(k.startswith("lesion.szm_") for k in features) and any(k.startswith("lesion.rlm_") for k in features)


def test_relative_features_equal_an_independent_computation():
    image, labels = gland_with_lesion(3, lesion_hu=40.0, parenchyma_hu=110.0)
    features = lesion_features(image, labels, SPACING)
    lesion = select_lesion(labels)
    values = np.rint(image[lesion]).astype(float)
    shell = np.rint(image[shell_around(lesion, labels, SPACING)]).astype(float)
    assert features["relative.mean_contrast"] == pytest.approx((values.mean() - shell.mean()) / shell.mean(), abs=1e-4)
    assert features["relative.sd_ratio"] == pytest.approx(values.std() / shell.std(), rel=1e-4)
    # IBSI's 10th and 90th percentiles are numpy's linear ones on the rounded intensities
    assert features["relative.p10"] == pytest.approx(np.percentile(values, 10) / shell.mean(), abs=1e-4)
    assert features["relative.p90"] == pytest.approx(np.percentile(values, 90) / shell.mean(), abs=1e-4)


def test_relative_features_ignore_a_change_of_enhancement_that_moves_absolute_hu():
    """Contrast timing scales enhancement: the absolute mean moves by tens of HU, the relative features barely."""
    image, labels = gland_with_lesion(4, lesion_hu=40.0, parenchyma_hu=110.0)
    early, late = lesion_features(image, labels, SPACING), lesion_features(image * 0.7, labels, SPACING)
    assert abs(early["lesion.stat_mean"] - late["lesion.stat_mean"]) > 10
    for name in ("relative.mean_contrast", "relative.p10", "relative.p90", "relative.sd_ratio"):
        assert late[name] == pytest.approx(early[name], rel=0.02, abs=0.01), name


def test_relative_features_are_missing_without_an_enhancing_shell():
    base = {"lesion.stat_mean": 30.0, "lesion.stat_p10": 20.0, "lesion.stat_p90": 40.0, "lesion.stat_var": 64.0}
    assert all(np.isnan(v) for v in relative_features(base).values())  # no shell at all
    watery = relative_features({**base, "shell.stat_mean": 5.0, "shell.stat_var": 16.0})
    assert np.isnan(watery["relative.mean_contrast"]) and watery["relative.sd_ratio"] == pytest.approx(2.0)


def test_shell_lies_in_the_gland_within_its_distance():
    _, labels = gland_with_lesion(1, lesion_hu=30.0)
    lesion = labels == 2
    shell = shell_around(lesion, labels, SPACING, shell_mm=4.0)
    assert shell.any() and not (shell & lesion).any() and (labels[shell] == 1).all()
    # every shell voxel within 4 mm of the lesion, and the voxels within 2 mm of it all in the shell
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(~lesion, sampling=SPACING)
    assert distance[shell].max() <= 4.0 + 1e-9
    assert shell[(distance > 0) & (distance <= 2.0)].all()


def test_no_lesion_no_features():
    _, labels = gland_with_lesion(2, lesion_hu=30.0)
    labels[labels == 2] = 1
    assert lesion_features(np.zeros(labels.shape, np.float32), labels, SPACING) is None


def test_image_in_hu_inverts_nnunets_ct_normalisation():
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

    properties = {"mean": 80.0, "std": 45.0, "percentile_00_5": -60.0, "percentile_99_5": 260.0}
    hu = np.linspace(-200, 400, 61, dtype=np.float32).reshape(1, 61)
    normalised = CTNormalization(intensityproperties=properties).run(hu.copy())
    back = image_in_hu(normalised, "CTNormalization", properties)
    assert np.allclose(back, np.clip(hu, -60.0, 260.0), atol=1e-3)
    assert np.array_equal(image_in_hu(normalised, "ZScoreNormalization", properties), normalised)


# ------------------------------------------------------------------------------------------- linear model


def blobs(seed: int, n_per_class: int = 30, shift: float = 3.0):
    rng = np.random.default_rng(seed)
    rows, y = [], []
    for k in range(3):
        for _ in range(n_per_class):
            x = rng.normal(0, 1, 4)
            x[k] += shift
            rows.append({f"f{i}": float(v) for i, v in enumerate(x)})
            y.append(k)
    return rows, np.array(y)


@pytest.mark.parametrize("kind", ["lda", "logistic"])
def test_linear_model_matches_scikit_learn(kind):
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    rows, y = blobs(0)
    model = fit_linear(rows, y, 3, kind)
    x = np.array([[r[f"f{i}"] for i in range(4)] for r in rows])
    scaled = StandardScaler().fit_transform(x)
    reference = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto") if kind == "lda" else \
        LogisticRegressionCV(Cs=np.logspace(-3, 1, 9), cv=5, class_weight="balanced", max_iter=5000, l1_ratios=(0.0,),
                             scoring="neg_log_loss", use_legacy_attributes=False)
    expected = reference.fit(scaled, y).predict_proba(scaled)
    assert np.allclose(softmax(model.logits(rows)), expected, atol=1e-6)


def test_linear_model_imputes_missing_features_with_the_training_median():
    rows, y = blobs(1)
    model = fit_linear(rows, y, 3, "lda")
    median = float(np.median([r["f2"] for r in rows]))
    with_nan = dict(rows[0], f2=float("nan"))
    assert np.allclose(model.logits([with_nan]), model.logits([dict(rows[0], f2=median)]))
    assert np.allclose(model.logits([{k: v for k, v in rows[0].items() if k != "f2"}]), model.logits([with_nan]))


# ------------------------------------------------------------------------------------------- calibration


def test_temperature_lowers_the_nll_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    predicted = np.where(rng.random(300) < 0.7, y, (y + 1) % 3)  # right 70 % of the time...
    logits = 12.0 * np.eye(3)[predicted]  # ...at p ~ 1
    t = fit_temperature(logits, y)
    assert t > 3.0
    assert nll(logits / t, y) < 0.75 * nll(logits, y)
    # and the calibrated confidence is close to the 70 % accuracy
    assert softmax(logits / t).max(1).mean() == pytest.approx(0.7, abs=0.05)


def test_network_temperature_never_sharpens():
    y = np.array([0, 1, 2, 0, 1, 2])
    logits = 0.5 * np.eye(3)[y]  # right and under-confident: the NLL would want T < 1
    assert fit_temperature(logits, y) < 1.0
    assert fit_temperature(logits, y, minimum=1.0) == pytest.approx(1.0, abs=1e-3)


# ------------------------------------------------------------------------------------------------ fusion


def records(seed: int, n: int, cnn_right: bool, features_right: bool):
    """Cases whose head and features each point at the truth or at the next subtype."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = i % 3
        cnn_class = k if cnn_right else (k + 1) % 3
        feature_class = k if features_right else (k + 2) % 3
        x = rng.normal(0, 0.3, 3)
        x[feature_class] += 3.0
        out.append({"case": f"c{seed}_{i}", "subtype": k, "fold_logits": [(4.0 * np.eye(3)[cnn_class]).tolist()],
                    "features": {f"f{j}": float(v) for j, v in enumerate(x)}})
    return out


def test_fusion_weight_follows_the_held_out_cases():
    fit_rows = records(0, 30, cnn_right=True, features_right=True)  # the feature model learns f_k -> k
    heads_right = fit_classifier(fit_rows, records(1, 12, cnn_right=True, features_right=False), ["a", "b", "c"])
    features_right = fit_classifier(fit_rows, records(2, 12, cnn_right=False, features_right=True), ["a", "b", "c"])
    assert heads_right.fusion_weight == 1.0
    assert features_right.fusion_weight == 0.0
    assert heads_right.validation["fused"]["macro_f1"] == 1.0 == features_right.validation["fused"]["macro_f1"]



def test_fusion_is_the_default_only_when_enough_held_out_cases_show_a_clear_gain():
    fit_rows = records(0, 30, cnn_right=True, features_right=True)
    names = ["a", "b", "c"]
    # the head wrong, the features right: 12 held-out cases are too few to trust it, 36 are enough
    assert fit_classifier(fit_rows, records(2, 12, cnn_right=False, features_right=True), names).default_variant \
        == "cnn"
    many = fit_classifier(fit_rows, records(3, 36, cnn_right=False, features_right=True), names)
    assert many.default_variant == "fused" and many.validation["cnn"]["macro_f1"] == 0.0
    # both right on 36 cases: no gain, the calibrated head stays the default
    assert fit_classifier(fit_rows, records(4, 36, cnn_right=True, features_right=True), names).default_variant \
        == "cnn"



def test_fusion_ahead_in_macro_f1_but_worse_in_nll_is_not_the_default():
    """A gain in macro-F1 that comes with worse held-out probabilities is not taken (the rule's second half)."""
    from nnunet_mtl.training.subtype_fit import choose_default_variant

    better = {"cnn": {"macro_f1": 0.73, "nll": 0.58}, "fused": {"macro_f1": 0.78, "nll": 0.57}}
    assert choose_default_variant(better, 60) == "fused"
    assert choose_default_variant(better, 29) == "cnn"  # too few held-out cases
    worse_nll = {"cnn": {"macro_f1": 0.73, "nll": 0.58}, "fused": {"macro_f1": 0.78, "nll": 0.81}}
    assert choose_default_variant(worse_nll, 60) == "cnn"
    small_gain = {"cnn": {"macro_f1": 0.73, "nll": 0.58}, "fused": {"macro_f1": 0.77, "nll": 0.50}}
    assert choose_default_variant(small_gain, 60) == "cnn"


def test_the_relative_feature_set_fits_on_relative_features_only_even_from_older_records():
    """`--feature-set relative`: the feature model sees only ratios to the parenchyma and the histogram's shape;
    records stored before the relative features existed get them derived, and predict supplies them by name."""
    rng = np.random.default_rng(5)

    def record(i: int, with_relative: bool) -> dict:
        k = i % 3
        shell = float(rng.uniform(70, 130))  # the scan's enhancement level varies, the lesion's ratio to it not
        mean = shell * (0.4, 0.1, 1.5)[k] + rng.normal(0, 3)
        features = {"lesion.stat_mean": mean, "lesion.stat_p10": mean - 10, "lesion.stat_p90": mean + 10,
                    "lesion.stat_var": 100.0, "lesion.stat_skew": float(rng.normal()), "lesion.stat_kurt": 0.0,
                    "lesion.ih_mean_fbs_w25.0": mean / 25, "shell.stat_mean": shell, "shell.stat_var": 100.0}
        if with_relative:
            features.update(relative_features(features))
        return {"case": f"c{i}", "subtype": k, "fold_logits": [[0.0, 0.0, 0.0]], "features": features}

    old = [record(i, False) for i in range(30)]
    held = [record(100 + i, True) for i in range(12)]
    fitted = fit_classifier(old, held, ["a", "b", "c"], feature_set="relative")
    names = fitted.feature_model.feature_names
    assert names and all(n.startswith(("relative.", "lesion.stat_skew", "lesion.stat_kurt")) for n in names)
    assert "relative.mean_contrast" in names and fitted.provenance["feature_set"] == "relative"
    assert fitted.validation["features"]["macro_f1"] == 1.0
    everything = fit_classifier(old, held, ["a", "b", "c"])
    assert "lesion.ih_mean_fbs_w25.0" in everything.feature_model.feature_names
    with pytest.raises(ValueError, match="feature set"):
        fit_classifier(old, held, ["a", "b", "c"], feature_set="texture")


def test_the_classifier_rests_on_the_training_and_validation_records_only(tmp_path):
    """What the model folder's records hold is all a fit sees: test labels cannot leak into it."""
    fold = tmp_path / "fold_0"
    fold.mkdir()
    train, validation = records(0, 30, True, True), records(1, 12, True, False)
    save_records(fold, "train", train)
    save_records(fold, "validation", validation)
    names = ["a", "b", "c"]
    fitted = fit_from_model_folder(tmp_path, names)
    assert fitted.provenance["feature_fit_cases"] == 30 and fitted.provenance["heldout_cases"] == 12
    direct = fit_classifier(train, validation, names)
    assert fitted.to_json() == {**direct.to_json(), "provenance": fitted.provenance}
    # the stored file round-trips to the same probabilities
    fitted.save(tmp_path)
    loaded = load_classifier(tmp_path)
    case = records(3, 1, True, True)[0]
    for variant, p in fitted.probabilities(case["fold_logits"], case["features"]).items():
        assert np.allclose(loaded.probabilities(case["fold_logits"], case["features"])[variant], p)
    assert json.loads((tmp_path / "subtype_classifier.json").read_text())["class_names"] == names


def test_without_a_lesion_fused_is_the_calibrated_head_and_folds_average_their_probabilities():
    classifier = SubtypeClassifier(["a", "b", "c"], cnn_temperature=2.0)
    folds = [np.array([4.0, 0.0, 0.0]), np.array([0.0, 4.0, 0.0])]
    got = classifier.probabilities(folds, None)
    expected = (softmax(folds[0] / 2.0) + softmax(folds[1] / 2.0)) / 2
    assert np.allclose(got["cnn"], expected) and np.allclose(got["fused"], expected) and "features" not in got


def test_too_few_lesions_per_subtype_leave_the_head_alone():
    fit_rows = records(0, 12, cnn_right=True, features_right=True)  # 4 per subtype, below the minimum of 5
    classifier = fit_classifier(fit_rows, records(1, 6, True, True), ["a", "b", "c"])
    assert classifier.feature_model is None and classifier.default_variant == "cnn"
    assert "needs 5 each" in classifier.provenance["note"]
