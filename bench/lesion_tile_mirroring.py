"""Does mirroring the subtype's lesion tile pay for its 8 encoder passes? Both from one default-mode run.

Default mode mirrors every sliding-window tile (nnU-Net's 8 passes). The subtype comes from one more patch centred on
the predicted lesion; until 2026-12-01 that patch was mirrored too, which costs as much as a crop of one tile and made
default mode slower than stock nnU-Net at full size. This bench predicts a phantom's test set once in default mode
with the patch mirrored, records the head's logits of each of its passes, and scores, on the same cases, the subtype
from the mirrored average (the old default) against the subtype from the unmirrored pass alone (the new default),
each raw and with the model's calibrated temperature. Masks are the same in both (the patch does not change them);
cases without a predicted lesion keep the sliding window's record in both.

Only meaningful for a model trained with mirroring (a demo-recipe model has none: both arms are then identical):
  python bench/classification.py --workdir W --train-sites A --test-sites A B --ablation mirror --train-only
  python bench/lesion_tile_mirroring.py --model W/nnunet/nnUNet_results/Dataset710_SiteA/\
nnUNetTrainerMTL__nnUNetPlans_MTLdemo_mirror__3d_fullres --phantom W/phantom_B --out W/tile_mirroring_B
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classification import balanced_accuracy, ece, macro_f1, truth_subtypes  # noqa: E402

ARMS = ("mirrored", "single")


def record_both(model: Path, images: Path, out: Path, device: str,
                segmentation: str = "default") -> dict[str, dict[str, np.ndarray]]:
    """Predict ``images`` with the lesion tile mirrored; per case, the head's fold logits of both arms
    (``mirrored``: as predicted; ``single``: the lesion tile's unmirrored pass). ``segmentation="fast"``: the crop in
    fast mode (8x cheaper), only the lesion tile mirrored."""
    import torch

    from nnunet_mtl.inference import predict as predict_module
    from nnunet_mtl.inference.predict import PredictionMode, load_predictor, predict_folder

    mode = PredictionMode(lesion_tile_mirroring=True) if segmentation == "default" else \
        PredictionMode.fast(lesion_tile_mirroring=True)
    predictor = load_predictor(model, device=torch.device(device), mode=mode)
    passes: list[np.ndarray] = []  # the lesion tile's classify passes of the case being inferred
    logits: dict[str, dict[str, np.ndarray]] = {}
    classify, infer_case, load = predictor.engine.classify, predict_module.infer_case, predict_module.load_predictor
    classify_mirrored = predictor._classify_mirrored

    def mirrored_patch(tile, probability):  # fast mode: mirror the patch though the crop was not
        use_mirroring, predictor.use_mirroring = predictor.use_mirroring, True
        try:
            return classify_mirrored(tile, probability)
        finally:
            predictor.use_mirroring = use_mirroring

    if segmentation == "fast":
        predictor._classify_mirrored = mirrored_patch

    def recording_classify(tile, probability):
        result = classify(tile, probability)
        passes.append(result.float().cpu().numpy()[0])
        return result

    def recording_infer_case(p, prepared):
        passes.clear()
        inferred = infer_case(p, prepared)
        mirrored = np.asarray(p.last_fold_logits, float)
        if len(passes) not in (0, 8) or mirrored.shape[0] != 1:
            raise RuntimeError(f"{prepared.case}: {len(passes)} lesion-tile passes and {mirrored.shape[0]} folds; "
                               "this bench expects one fold and 8 mirrors or none")
        single = passes[0][None].astype(float) if passes else mirrored
        logits[prepared.case] = {"mirrored": mirrored, "single": single}
        return inferred

    predictor.engine.classify = recording_classify
    predict_module.infer_case = recording_infer_case
    predict_module.load_predictor = lambda *args, **kwargs: predictor
    try:
        report = predict_folder(model, images, out, device=torch.device(device), mode=mode, overwrite=True,
                                progress=False)
    finally:
        predict_module.infer_case, predict_module.load_predictor = infer_case, load
    if report.failed:
        raise RuntimeError(report.failed)
    return logits


def paired_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray, statistic, n: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """statistic(b) - statistic(a) on the same cases, with a 95 % bootstrap interval over cases."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        diffs.append(statistic(y[i], b[i]) - statistic(y[i], a[i]))
    return statistic(y, b) - statistic(y, a), float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def score(logits: dict[str, dict[str, np.ndarray]], truth: dict[str, int], model: Path) -> dict:
    from nnunet_mtl.model.subtype_classifier import load_classifier, softmax

    classifier = load_classifier(model)
    cases = sorted(c for c in logits if c in truth)
    y = np.array([truth[c] for c in cases])
    probabilities = {}
    for arm in ARMS:
        probabilities[f"{arm} raw"] = np.array([softmax(logits[c][arm].mean(0)) for c in cases])
        if classifier is not None:
            probabilities[f"{arm} calibrated"] = np.array(
                [classifier.probabilities(list(logits[c][arm]), None)["cnn"] for c in cases])
    with_tile = sum(not np.array_equal(logits[c]["mirrored"], logits[c]["single"]) for c in cases)
    result = {"cases": len(cases), "cases_with_lesion_tile": with_tile, "arms": {}, "differences": {}}
    for name, p in probabilities.items():
        result["arms"][name] = {"macro_f1": macro_f1(y, p), "balanced_accuracy": balanced_accuracy(y, p),
                                "ece": ece(y, p)}
    for kind in ("raw", "calibrated"):
        a, b = probabilities.get(f"mirrored {kind}"), probabilities.get(f"single {kind}")
        if a is None:
            continue
        result["differences"][kind] = {
            "subtype_agreement": float(np.mean(a.argmax(1) == b.argmax(1))),
            "max_probability_difference": float(np.abs(a - b).max()),
            "macro_f1": paired_difference(y, a, b, macro_f1),
            "ece": paired_difference(y, a, b, ece)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--phantom", type=Path, required=True, help="phantom folder (test/ and phantom.json)")
    parser.add_argument("--out", type=Path, required=True, help="predictions and logits.json go here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--segmentation", choices=["default", "fast"], default="default",
                        help="mode of the crop's pass (default: nnU-Net's settings; fast: 8x cheaper, the patch's "
                             "attention then comes from an unmirrored crop)")
    args = parser.parse_args()
    stored = args.out / "logits.json"
    if stored.is_file():  # scoring again without predicting again
        content = json.loads(stored.read_text())
        logits = {c: {arm: np.array(v) for arm, v in arms.items()} for c, arms in content.items()}
    else:
        logits = record_both(args.model, args.phantom / "test", args.out / "predictions", args.device,
                             args.segmentation)
        stored.write_text(json.dumps({c: {arm: v.tolist() for arm, v in arms.items()} for c, arms in logits.items()}))
    result = score(logits, truth_subtypes(args.phantom), args.model)
    print(f"{result['cases']} cases, {result['cases_with_lesion_tile']} with a lesion tile")
    print(f"{'arm':<22}{'macro-F1':>10}{'bal. acc':>10}{'ECE':>8}")
    for name, r in result["arms"].items():
        print(f"{name:<22}{r['macro_f1']:>10.3f}{r['balanced_accuracy']:>10.3f}{r['ece']:>8.3f}")
    for kind, d in result["differences"].items():
        f1, e = d["macro_f1"], d["ece"]
        print(f"single - mirrored ({kind}): macro-F1 {f1[0]:+.3f} [{f1[1]:+.3f}, {f1[2]:+.3f}], ECE {e[0]:+.3f} "
              f"[{e[1]:+.3f}, {e[2]:+.3f}]; same subtype in {d['subtype_agreement']:.1%} of cases, largest "
              f"probability difference {d['max_probability_difference']:.3f}")
    (args.out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
