"""Fit the subtype classifier of a trained model from per-case records: the head's logits and the lesion features.

A record is what prediction says of one labelled case: its true subtype, the head's logits per fold and the radiomics
of the lesion the model predicted (``None`` when it predicted none). Records are written beside each fold's
validation (``fold_<k>/subtype_records.json``: ``validation`` = held-out cases, ``validation_shifted`` = the same
under acquisition shifts (head logits only, training/shift_calibration.py), ``train`` = the fold's own training
cases predicted by its final weights), so the classifier can be refitted without predicting again
(``nnunet-mtl fit-classifier``).

Two ways to fit, by what the model folder holds:

- **out-of-fold** (cross-validation folds trained, every training case held out by one of them): the feature model is
  fitted on the out-of-fold predicted lesions of all training cases, and every temperature and the fusion weight on
  the out-of-fold predictions: as many cases as there are training cases;
- **one fold**: the feature model is fitted on the fold's training cases as its final weights segment them (masks a
  little better than on unseen cases; the price of not training more folds), its temperature on its own
  cross-validated logits there plus the validation cases, and the network's temperature and the fusion weight on the
  validation fold alone (its case count is stored and shown: a dozen cases choose a weight coarsely).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nnunet_mtl.model.lesion_features import select_features
from nnunet_mtl.model.subtype_classifier import (
    FUSION_GRID,
    SubtypeClassifier,
    cross_validated_logits,
    fit_linear,
    fit_temperature,
    log_softmax,
    nll,
    softmax,
)

RECORDS_FILE = "subtype_records.json"
# Below this many training cases with a predicted lesion per subtype, a feature model (and its cross-validated
# calibration) would rest on nothing: the head alone then.
MIN_CASES_PER_CLASS = 5
# Which variant predict uses by default. On 150 test cases at each of three phantom sites (bench/classification.py,
# trained on site A, docs/measurements-classification.md) the fused variant chosen on 12 validation cases was no
# better than the calibrated head in macro-F1 (0.820 / 0.594 / 0.745 vs 0.832 / 0.624 / 0.730) and worse calibrated at
# every site (ECE 0.212 / 0.130 / 0.187 vs 0.145 / 0.100 / 0.046): 12 cases cannot show a difference, so fusion
# becomes the default only when enough held-out cases show a clear gain. A five-fold ensemble's 60 out-of-fold cases
# then showed fusion +0.05 macro-F1 ahead but with a held-out NLL of 0.81 against the head's 0.58, and on another
# site's 150 test cases it was the worse variant (macro-F1 0.680 vs 0.714, ECE 0.183 vs 0.058): so the gain must also
# come without worse held-out probabilities (NLL, a proper score), which macro-F1 on a few dozen cases cannot show.
MIN_HELDOUT_FOR_FUSION = 30
FUSION_MARGIN = 0.05


def save_records(fold_dir: Path, split: str, records: list[dict]) -> None:
    """Add one split's records (``train`` or ``validation``) to the fold's records file, atomically."""
    path = Path(fold_dir) / RECORDS_FILE
    content = json.loads(path.read_text()) if path.is_file() else {}
    content[split] = records
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content) + "\n")
    os.replace(tmp, path)


def load_records(fold_dir: Path) -> dict[str, list[dict]]:
    path = Path(fold_dir) / RECORDS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _macro_f1(y: Sequence[int], probabilities: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, probabilities.argmax(1), average="macro", labels=list(range(n_classes)),
                          zero_division=0))


def variant_metrics(y: Sequence[int], probabilities: np.ndarray, n_classes: int) -> dict:
    """Held-out macro-F1, accuracy, NLL and ECE of one variant's probabilities."""
    from nnunet_mtl.evaluation.metrics import calibration

    y = np.asarray(y, int)
    p = np.clip(np.asarray(probabilities, float), 1e-12, 1.0)
    return {"n_cases": int(len(y)), "macro_f1": _macro_f1(y, p, n_classes),
            "accuracy": float((p.argmax(1) == y).mean()), "nll": float(-np.log(p[np.arange(len(y)), y]).mean()),
            "ece": float(calibration(y, p)["ece"])}


def _cnn_logits(record: dict) -> np.ndarray:
    """The head's case logits of a held-out record: the mean over folds (one fold in practice)."""
    return np.mean(np.asarray(record["fold_logits"], float), axis=0)


def with_feature_set(records: list[dict], feature_set: str) -> list[dict]:
    """The records with only the features of ``feature_set`` (lesion_features.FEATURE_SETS)."""
    return [{**r, "features": select_features(r["features"], feature_set)} if r.get("features") else r
            for r in records]


def fit_classifier(fit_rows: list[dict], heldout: list[dict], class_names: list[str], kind: str = "lda",
                   source: str = "", feature_heldout_logits: np.ndarray | None = None,
                   feature_set: str = "all", shifted: list[dict] | None = None) -> SubtypeClassifier:
    """Fit the feature model on ``fit_rows`` (records with features) and calibrate and fuse on ``heldout``.

    ``feature_heldout_logits``: the feature model's logits for the held-out records when they come from elsewhere
    (out-of-fold fitting passes its cross-validated logits, since there the held-out cases are the fitted ones).
    ``feature_set``: which features the feature model uses (its names are stored with it, so predict follows).
    ``shifted``: the held-out cases' records under acquisition shifts (training/shift_calibration.py); the head's
    temperature is fitted on them and ``heldout`` together, and their numbers are reported as ``cnn_shifted*``.
    """
    n = len(class_names)
    fit_rows, heldout = with_feature_set(fit_rows, feature_set), with_feature_set(heldout, feature_set)
    with_features = [r for r in fit_rows if r.get("features")]
    classifier = SubtypeClassifier(list(class_names))
    y_held = np.array([r["subtype"] for r in heldout], int)
    cnn = np.array([_cnn_logits(r) for r in heldout]).reshape(len(heldout), n)
    shifted = [r for r in shifted or [] if r.get("fold_logits") is not None] if len(heldout) else []
    y_shifted = np.array([r["subtype"] for r in shifted], int)
    cnn_shifted = np.array([_cnn_logits(r) for r in shifted]).reshape(len(shifted), n)
    classifier.cnn_temperature = fit_temperature(np.vstack([cnn, cnn_shifted]), np.concatenate([y_held, y_shifted]),
                                                 minimum=1.0) if len(heldout) else 1.0
    cnn_log = log_softmax(cnn / classifier.cnn_temperature)
    provenance = {"source": source, "feature_model": kind, "feature_set": feature_set, "heldout_cases": len(heldout),
                  "feature_fit_cases": len(with_features), "cnn_temperature_cases": len(heldout)}
    validation = {"cnn_raw": variant_metrics(y_held, softmax(cnn), n) if len(heldout) else None,
                  "cnn": variant_metrics(y_held, np.exp(cnn_log), n) if len(heldout) else None}
    if shifted:
        provenance["cnn_temperature_shifted_cases"] = len(shifted)
        provenance["shifts"] = sorted({r.get("shift", "") for r in shifted})
        validation["cnn_shifted_raw"] = variant_metrics(y_shifted, softmax(cnn_shifted), n)
        validation["cnn_shifted"] = variant_metrics(y_shifted, softmax(cnn_shifted / classifier.cnn_temperature), n)
    per_class = np.bincount([r["subtype"] for r in with_features], minlength=n)
    if per_class.min() >= MIN_CASES_PER_CLASS:
        y_fit = [r["subtype"] for r in with_features]
        rows = [r["features"] for r in with_features]
        model = fit_linear(rows, y_fit, n, kind)
        classifier.feature_model = model
        # The feature model's temperature: its cross-validated logits on the cases it is fitted on, plus the
        # held-out cases when they are other cases, so it rests on more than a validation fold.
        held_has = [i for i, r in enumerate(heldout) if r.get("features")]
        if feature_heldout_logits is None:
            held_feature = model.logits([heldout[i]["features"] for i in held_has]).reshape(len(held_has), n)
            calibrate_on = np.vstack([cross_validated_logits(rows, y_fit, n, kind), held_feature])
            calibrate_y = np.concatenate([y_fit, y_held[held_has]])
        else:  # out-of-fold: the held-out cases are the fitted ones, and these are their cross-validated logits
            held_feature = np.asarray(feature_heldout_logits, float)[held_has].reshape(len(held_has), n)
            calibrate_on, calibrate_y = held_feature, y_held[held_has]
        classifier.feature_temperature = fit_temperature(calibrate_on, calibrate_y)
        provenance["feature_temperature_cases"] = len(calibrate_y)
        feature_log = np.array(cnn_log)  # cases without a lesion: the head alone
        feature_log[held_has] = log_softmax(held_feature / classifier.feature_temperature)
        has = np.zeros(len(heldout), bool)
        has[held_has] = True
        validation["features"] = variant_metrics(y_held[has], np.exp(feature_log[has]), n) if has.any() else None
        # Fusion weight by held-out macro-F1; ties go to the lower NLL, then to the smaller weight.
        scored = []
        for w in FUSION_GRID:
            fused = log_softmax(w * cnn_log + (1 - w) * feature_log)
            scored.append((_macro_f1(y_held, np.exp(fused), n), -nll(fused, y_held), -w, w))
        classifier.fusion_weight = max(scored)[3] if len(heldout) else 0.5
        fused = log_softmax(classifier.fusion_weight * cnn_log + (1 - classifier.fusion_weight) * feature_log)
        classifier.fused_temperature = fit_temperature(fused, y_held) if len(heldout) else 1.0
        validation["fused_uncalibrated"] = variant_metrics(y_held, np.exp(fused), n) if len(heldout) else None
        validation["fused"] = variant_metrics(y_held, softmax(fused / classifier.fused_temperature), n) \
            if len(heldout) else None
        provenance["fusion_cases"] = len(heldout)
        classifier.default_variant = choose_default_variant(validation, len(heldout))
        provenance["default_variant_rule"] = (
            f"fused when >= {MIN_HELDOUT_FOR_FUSION} held-out cases show its macro-F1 >= the calibrated head's + "
            f"{FUSION_MARGIN} and its NLL <= the head's, else the calibrated head")
    else:
        classifier.default_variant = "cnn"
        provenance["note"] = (f"too few training cases with a predicted lesion per subtype ({per_class.tolist()}; "
                              f"needs {MIN_CASES_PER_CLASS} each): no feature model, the head alone")
    classifier.provenance, classifier.validation = provenance, validation
    return classifier


def choose_default_variant(validation: dict, n_heldout: int) -> str:
    """"fused" when at least MIN_HELDOUT_FOR_FUSION held-out cases show it ahead of the calibrated head by
    FUSION_MARGIN in macro-F1 and no worse in NLL, else "cnn"."""
    fused, cnn = validation.get("fused"), validation.get("cnn")
    if n_heldout >= MIN_HELDOUT_FOR_FUSION and fused and cnn and fused["macro_f1"] >= cnn["macro_f1"] + FUSION_MARGIN \
            and fused["nll"] <= cnn["nll"]:
        return "fused"
    return "cnn"


def fit_from_model_folder(model_dir: Path, class_names: list[str], folds: Sequence[str] | None = None,
                          kind: str = "lda", feature_set: str = "all",
                          shift_calibration: bool = True) -> SubtypeClassifier:
    """Fit from the records the model folder's folds wrote: out-of-fold when several folds' validation cases cover
    their training cases, else from one fold's training and validation records. ``shift_calibration``: use the
    folds' ``validation_shifted`` records, where they exist, for the head's temperature."""
    model_dir = Path(model_dir)
    fold_dirs = [model_dir / f"fold_{f}" for f in folds] if folds else sorted(model_dir.glob("fold_*"))
    found = {d.name: load_records(d) for d in fold_dirs}
    found = {k: v for k, v in found.items() if v.get("validation")}
    if not found:
        raise FileNotFoundError(f"{model_dir}: no fold holds {RECORDS_FILE} (train the model first)")
    cross_validation = [k for k in found if k != "fold_0"]
    if len(cross_validation) >= 2:  # out-of-fold: every case once, from the fold that held it out
        oof = {r["case"]: r for k in cross_validation for r in found[k]["validation"]}
        records = with_feature_set([oof[c] for c in sorted(oof)], feature_set)
        with_features = [r for r in records if r.get("features")]
        y = [r["subtype"] for r in with_features]
        enough = np.bincount(y, minlength=len(class_names)).min() >= MIN_CASES_PER_CLASS if y else False
        own = cross_validated_logits([r["features"] for r in with_features], y, len(class_names), kind) \
            if enough else None
        feature_logits = None
        if own is not None:
            feature_logits = np.zeros((len(records), len(class_names)))
            index = {id(r): i for i, r in enumerate(records)}
            for r, logits in zip(with_features, own):
                feature_logits[index[id(r)]] = logits
        shifted = [r for k in cross_validation for r in found[k].get("validation_shifted", [])] \
            if shift_calibration else []
        return fit_classifier(records, records, class_names, kind,
                              f"out-of-fold predictions of {len(cross_validation)} cross-validation folds "
                              f"({', '.join(sorted(cross_validation))})", feature_logits, feature_set, shifted)
    name = "fold_0" if "fold_0" in found else sorted(found)[0]
    records = found[name]
    if not records.get("train"):
        raise FileNotFoundError(f"{model_dir / name / RECORDS_FILE} has no training-case records")
    return fit_classifier(records["train"], records["validation"], class_names, kind,
                          f"{name}: feature model on its {len(records['train'])} training cases (as its final "
                          f"weights segment them), calibration and fusion on its {len(records['validation'])} "
                          "validation cases", feature_set=feature_set,
                          shifted=records.get("validation_shifted", []) if shift_calibration else [])
