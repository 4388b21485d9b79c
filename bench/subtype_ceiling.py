"""How much of the subtype can be known at each phantom site: the bar's ceiling, and where a model's errors sit.

The cross-site bar (macro-F1 >= 0.85) is only meaningful if the phantom allows it. This scores the product's own
feature model (MIRP radiomics of the lesion and its parenchyma shell, shrinkage LDA or logistic regression) on the
**true** lesion masks, so mask quality is out of the way (on each case's own grid, where the product computes them on
the model's preprocessed grid: close, not identical):

  cross-site   fitted on the training site's 72 training + validation cases, scored on another site's test cases
               (the best a feature path on perfect masks does under the shift);
  in-site CV   fitted on the test site's own cases (its 72 training + validation cases and, 5-fold, its other test
               cases), scored out of fold on its test cases: no shift at all, the phantom's own separability.

Each is split into typical and atypical lesions (``phantom.json`` says which: iso-attenuating or necrotic solid
masses, proteinaceous cysts, weakly enhancing or cystic hyper-enhancing masses, drawn to mimic another subtype).
``--runs`` adds the product's predictions of bench/classification.py runs (``preds_<run>_on_<site>``) split the
same way, so a model's errors can be told apart: atypical mimics or typical lesions it should have named.

  python bench/subtype_ceiling.py --workdir /work/bench_cls --train-site A --sites A B C --runs A_long
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classification import bootstrap, macro_f1  # noqa: E402

KINDS = ("lda", "logistic")


def true_mask_features(phantom: Path, cache: Path) -> dict[str, dict]:
    """Per case of the phantom: subtype, split, atypical, and the product's features on its true lesion (cached)."""
    import SimpleITK as sitk

    from nnunet_mtl.model.lesion_features import lesion_features

    stored = json.loads(cache.read_text()) if cache.is_file() else {}
    summary = json.loads((phantom / "phantom.json").read_text())
    for case in summary["cases"]:
        if case["name"] in stored:
            continue
        image = sitk.ReadImage(str(phantom / case["image"]))
        labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(phantom / case["mask"])))).astype(np.uint8)
        features = lesion_features(sitk.GetArrayFromImage(image).astype(np.float32), labels,
                                   image.GetSpacing()[::-1])
        stored[case["name"]] = {"subtype": case["subtype"], "split": case["split"], "atypical": case["atypical"],
                                "features": {k: float(v) for k, v in features.items()}}
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(stored))
    tmp.replace(cache)
    return stored


def probabilities(fit_rows: list[dict], fit_y: list[int], rows: list[dict], kind: str, feature_set: str) -> np.ndarray:
    from nnunet_mtl.model.lesion_features import select_features
    from nnunet_mtl.model.subtype_classifier import fit_linear, softmax

    model = fit_linear([select_features(r, feature_set) for r in fit_rows], fit_y, 3, kind)
    return softmax(model.logits([select_features(r, feature_set) for r in rows]))


def in_site_cv(cases: dict[str, dict], test: list[str], kind: str, feature_set: str, folds: int = 5) -> np.ndarray:
    """Out-of-fold probabilities of the site's test cases, each fold fitted on the site's training + validation
    cases and its other test cases."""
    from sklearn.model_selection import StratifiedKFold

    development = [c for c, v in cases.items() if v["split"] != "test"]
    y = np.array([cases[c]["subtype"] for c in test])
    out = np.zeros((len(test), 3))
    for fit, held in StratifiedKFold(folds, shuffle=True, random_state=0).split(np.zeros(len(test)), y):
        names = development + [test[i] for i in fit]
        out[held] = probabilities([cases[c]["features"] for c in names], [cases[c]["subtype"] for c in names],
                                  [cases[test[i]]["features"] for i in held], kind, feature_set)
    return out


def product_probabilities(workdir: Path, run: str, site: str, test: list[str], variant: str) -> np.ndarray | None:
    from nnunet_mtl.inference.outputs import read_details

    folder = workdir / f"preds_{run}_on_{site}"
    details = read_details(folder) if folder.is_dir() else {}
    if not all(c in details for c in test):
        return None
    return np.array([details[c]["probabilities"][variant] for c in test])


def line(label: str, y: np.ndarray, p: np.ndarray, atypical: np.ndarray) -> str:
    value, low, high = bootstrap(y, p, macro_f1)
    right = p.argmax(1) == y
    typical_f1 = macro_f1(y[~atypical], p[~atypical])
    typical = f"{right[~atypical].sum():>3}/{(~atypical).sum():<3}"
    return (f"{label:<52} {value:.3f} [{low:.3f}, {high:.3f}]   {typical_f1:.3f}"
            f"        {typical}       {right[atypical].sum():>2}/{atypical.sum()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="bench/classification.py's workdir")
    parser.add_argument("--train-site", default="A")
    parser.add_argument("--sites", nargs="+", default=["A", "B"])
    parser.add_argument("--runs", nargs="*", default=[], help="bench/classification.py runs to split the same way")
    parser.add_argument("--variant", default="cnn", help="the runs' classifier variant (default: calibrated head)")
    parser.add_argument("--feature-sets", nargs="+", default=["all", "relative"],
                        help="lesion_features.FEATURE_SETS to score (default: both)")
    args = parser.parse_args()

    features = {site: true_mask_features(args.workdir / f"phantom_{site}",
                                         args.workdir / f"ceiling_features_{site}.json")
                for site in sorted({args.train_site, *args.sites})}
    source = features[args.train_site]
    development = [c for c, v in source.items() if v["split"] != "test"]
    fit_rows = [source[c]["features"] for c in development]
    fit_y = [source[c]["subtype"] for c in development]
    print("subtype ceiling: the product's feature model on TRUE lesion masks (95 % bootstrap over test cases)")
    print(f"{'test site  model':<52} {'macro-F1':<21}   typical F1   typical right   atypical right")
    for site in args.sites:
        cases = features[site]
        test = sorted(c for c, v in cases.items() if v["split"] == "test")
        y = np.array([cases[c]["subtype"] for c in test])
        atypical = np.array([cases[c]["atypical"] for c in test])
        rows = [cases[c]["features"] for c in test]
        for feature_set in args.feature_sets:
            for kind in KINDS:
                label = f"{kind}, {feature_set}"
                print(line(f"{site}  {args.train_site}->{site} true masks, {label}", y,
                           probabilities(fit_rows, fit_y, rows, kind, feature_set), atypical))
                print(line(f"{site}  in-site CV true masks, {label}", y, in_site_cv(cases, test, kind, feature_set),
                           atypical))
        for run in args.runs:
            p = product_probabilities(args.workdir, run, site, test, args.variant)
            if p is not None:
                print(line(f"{site}  product {run} ({args.variant}, predicted masks)", y, p, atypical))
        print()


if __name__ == "__main__":
    main()
