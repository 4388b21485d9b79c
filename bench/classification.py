"""Does the subtype carry over to data it was not built on? Train on one phantom site, test on every site.

Phantom sites (``nnunet-mtl phantom --site``) differ in scanner and protocol (slice thickness, pixel size, kernel
noise and blur, contrast timing, HU calibration) and in their patients' lesion appearances. For each training site
this trains the demo recipe (the model a `make demo` user gets, subtype classifier included), predicts every site's
test set (>= 150 cases each) in fast mode, and prints, for every classifier variant, macro-F1, balanced accuracy and
ECE with 95 % bootstrap intervals over cases, in-site and cross-site side by side. Beside the product's variants it
scores a two-feature intensity model (mean and SD of HU in the lesion; logistic regression fitted on the training
site's training and validation cases) on true and on predicted lesions: a phantom that mean HU solves is too easy to
tell anything.

Variants (all from one prediction run; ``subtype_details.json`` holds them):
  cnn_raw   the network's head, uncalibrated (what the product wrote before this classifier existed)
  cnn       the head with its temperature
  features  the linear model on the predicted lesion's radiomics, calibrated
  fused     the product's default: both, weighted as the validation fold chose, calibrated
  refit:*   feature models refitted here from the stored training records (offline ablations: --refit)

Every stage is reused when its output exists, so a second run only scores (and a crashed run resumes).

  python bench/classification.py --workdir work_cls                       # train on A and B, test on A, B, C
  python bench/classification.py --workdir work_cls --train-sites A --test-sites A B C --n-test 150
  python bench/classification.py --workdir work_cls --train-sites A --test-sites B A --folds 1 2 3 4 5  # ensemble
  python bench/classification.py --workdir work_cls --train-sites A+B --test-sites C A B  # two sites pooled
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

SITES_DEFAULT = ("A", "B", "C")
DATASET_BASE_ID = 710
BOOTSTRAP = 1000


# ---------------------------------------------------------------------------------------------------- stages


POOLED_ID_OFFSET = 500  # the k-th site of a pool renumbers its cases by k x 500 (sites reuse case numbers)


def pooled_sites(site: str) -> list[str]:
    """``A+B`` trains on sites A and B together; a single letter is one site."""
    return site.split("+")


def pool_phantoms(workdir: Path, pool: str, folders: dict[str, Path]) -> Path:
    """One published-layout folder holding the training and validation cases of every site of ``pool`` (links to
    the sites' own files, case numbers offset per site so they stay unique; no test cases: test on each site)."""
    import re

    folder = workdir / f"phantom_{pool}"
    if (folder / "pool.json").is_file():
        return folder
    for k, site in enumerate(pooled_sites(pool)):
        for path in sorted(folders[site].glob("*/subtype*/quiz_*.nii.gz")):
            split, subtype = path.parts[-3], path.parts[-2]
            if split not in ("train", "validation"):
                continue
            match = re.fullmatch(r"quiz_(\d+)_(\d+)(_0000)?\.nii\.gz", path.name)
            number = int(match.group(2)) + k * POOLED_ID_OFFSET
            target = folder / split / subtype / f"quiz_{match.group(1)}_{number:03d}{match.group(3) or ''}.nii.gz"
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(path)
    (folder / "pool.json").write_text(json.dumps({"sites": pooled_sites(pool), "id_offset": POOLED_ID_OFFSET}))
    return folder


def make_phantoms(workdir: Path, sites: list[str], n_test: int, seed: int) -> dict[str, Path]:
    """Each site's phantom (generated once); a pooled site ``A+B`` after its members."""
    from nnunet_mtl.data.phantom import generate_phantom_dataset

    folders = {}
    pools = [s for s in sites if "+" in s]
    for site in sorted({s for s in sites if "+" not in s} | {m for p in pools for m in pooled_sites(p)}):
        folder = workdir / f"phantom_{site}"
        if not (folder / "phantom.json").is_file():
            print(f"== phantom site {site}: {n_test} test cases", flush=True)
            generate_phantom_dataset(folder, "small", seed=seed, n_test=n_test, site=site, progress=False)
        folders[site] = folder
    for pool in pools:
        folders[pool] = pool_phantoms(workdir, pool, folders)
    return folders


def train_site(workdir: Path, site: str, phantom: Path, epochs: int, iterations: int, tag: str = "",
               extra: dict | None = None, folds: tuple[str, ...] = ("0",)) -> Path:
    """The demo recipe on one site's training data (fold 0, or several cross-validation folds whose out-of-fold
    predictions fit the classifier); returns the model folder."""
    from nnunet_mtl import paths
    from nnunet_mtl.data.importer import import_dataset, scan_published
    from nnunet_mtl.planning.plans import PLANS_CHOICES, derive_multitask_plans, plan_and_preprocess
    from nnunet_mtl.training.run import TrainSettings, train, train_folds
    from nnunet_mtl.training.trainer import cpu_has_fast_bf16

    work = paths.configure(workdir / "nnunet")
    members = pooled_sites(site)  # a pool: Dataset 720 + one bit per member site (A+B: 723), named SiteAandB
    dataset_id = DATASET_BASE_ID + SITES_DEFAULT.index(site) if len(members) == 1 else \
        DATASET_BASE_ID + 10 + sum(2 ** SITES_DEFAULT.index(m) for m in set(members))
    name = f"Site{'and'.join(members)}"
    raw = work.raw / paths.dataset_folder_name(dataset_id, name)
    if not (raw / "dataset.json").is_file():
        import_dataset(scan_published(phantom), work.raw, dataset_id, name, progress=False)
    preprocessed = work.preprocessed / paths.dataset_folder_name(dataset_id, name)
    if not (preprocessed / f"{PLANS_CHOICES['demo']}.json").is_file():
        plan_and_preprocess(dataset_id, "default", "demo")
    plans = PLANS_CHOICES["demo"]
    extra = dict(extra or {})
    head = extra.pop("head", None)
    demo_patch = extra.pop("demo_patch", None)
    if tag:  # an ablation: same plans under another identifier, so its model folder is its own
        plans = f"{PLANS_CHOICES['demo']}{tag}"
        content = json.loads((preprocessed / f"{PLANS_CHOICES['demo']}.json").read_text())
        if head is not None or demo_patch is not None:  # the demo plans derived again from nnU-Net's own, with
            # another head or patch (as `plan --head H --demo-patch Z Y X` writes them)
            base = json.loads((preprocessed / f"{content['multitask']['base_plans']}.json").read_text())
            content = derive_multitask_plans(base, content["multitask"]["subtype_names"],
                                             head=head or content["multitask"]["head"], preset="demo",
                                             demo_patch=demo_patch)
        content["plans_name"] = plans
        (preprocessed / f"{plans}.json").write_text(json.dumps(content, indent=1))
    model = work.results / paths.dataset_folder_name(dataset_id, name) / f"nnUNetTrainerMTL__{plans}__3d_fullres"
    trained = all((model / f"fold_{fold}" / "checkpoint_final.pth").is_file() for fold in folds)
    if not trained or not (model / "subtype_classifier.json").is_file():
        print(f"== train on site {site} {tag}", flush=True)
        recipe = dict(epochs=epochs, iterations=iterations, val_iterations=4, case_validation_every=epochs,
                      final_validation_fast=True, optimizer="adamw", mirror_augmentation=False,
                      max_rotation_degrees=15.0, cpu_bf16=cpu_has_fast_bf16())
        settings = TrainSettings(**{**recipe, **extra})  # an ablation may change the recipe's own settings
        started = time.perf_counter()
        if tuple(folds) == ("0",):
            train(dataset_id, plans, 0, "cpu", settings, resume=True)
        else:
            train_folds(dataset_id, plans, list(folds), "cpu", settings, resume=True)
        print(f"   trained in {time.perf_counter() - started:.0f} s", flush=True)
    return model


def predict_site(model: Path, phantom: Path, out: Path) -> Path:
    from nnunet_mtl.inference.outputs import read_details
    from nnunet_mtl.inference.predict import PredictionMode, list_cases, predict_folder

    images = phantom / "test"
    if len(read_details(out)) < len(list_cases(images)):
        print(f"== predict {phantom.name} with {model.parent.name}/{model.name}", flush=True)
        started = time.perf_counter()
        report = predict_folder(model, images, out, device=__import__("torch").device("cpu"),
                                mode=PredictionMode.fast(), progress=False)
        if report.failed:
            raise RuntimeError(f"prediction failed: {report.failed}")
        print(f"   {len(report.predicted)} cases in {time.perf_counter() - started:.0f} s", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------- scoring


def bootstrap(y: np.ndarray, p: np.ndarray, statistic, n: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float, float]:
    """(value, 2.5 %, 97.5 %) of ``statistic(y, p)`` over case resamples."""
    rng = np.random.default_rng(seed)
    value = statistic(y, p)
    samples = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        samples.append(statistic(y[idx], p[idx]))
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(value), float(low), float(high)


def macro_f1(y, p):
    from sklearn.metrics import f1_score

    return f1_score(y, p.argmax(1), average="macro", labels=[0, 1, 2], zero_division=0)


def balanced_accuracy(y, p):
    recalls = [(p.argmax(1)[y == k] == k).mean() for k in range(3) if (y == k).any()]
    return float(np.mean(recalls))


def ece(y, p):
    from nnunet_mtl.evaluation.metrics import calibration

    return calibration(y, p)["ece"]


def truth_subtypes(phantom: Path) -> dict[str, int]:
    summary = json.loads((phantom / "phantom.json").read_text())
    return {c["name"]: c["subtype"] for c in summary["cases"] if c["split"] == "test"}


def true_lesion_moments(phantom: Path, split: str) -> dict[str, tuple[list[float], int]]:
    """Mean and SD of HU in the true lesion of each case of a split (original grid): the two-feature check. A pooled
    folder (``phantom_A+C``) holds no phantom.json of its own: its member sites' cases, keyed ``site:case``."""
    import SimpleITK as sitk

    if (phantom / "pool.json").is_file():
        members = json.loads((phantom / "pool.json").read_text())["sites"]
        return {f"{site}:{name}": value for site in members
                for name, value in true_lesion_moments(phantom.parent / f"phantom_{site}", split).items()}
    summary = json.loads((phantom / "phantom.json").read_text())
    out = {}
    for case in summary["cases"]:
        if case["split"] not in split:
            continue
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom / case["image"]))).astype(float)
        lesion = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(phantom / case["mask"])))) == 2
        out[case["name"]] = ([image[lesion].mean(), image[lesion].std()], case["subtype"])
    return out


def two_feature_model(rows: list[list[float]], y: list[int]):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000)).fit(rows, y)


def moments_of(features: dict | None) -> list[float] | None:
    if not features:
        return None
    return [features["lesion.stat_mean"], float(np.sqrt(max(features["lesion.stat_var"], 0.0)))]


def subset_of(features: dict, prefixes: tuple[str, ...]) -> dict:
    """The features whose names start with one of ``prefixes`` (records made before the ``relative.*`` features
    existed get them derived, as the product's fit does)."""
    from nnunet_mtl.model.lesion_features import select_features

    return {k: v for k, v in select_features(features, "all").items() if k.startswith(prefixes)}


def score_pair(model: Path, phantom_train: Path, phantom_test: Path, preds: Path, refits: list[str],
               true_moments_cache: dict) -> dict[str, dict]:
    from nnunet_mtl.inference.outputs import read_details
    from nnunet_mtl.model.subtype_classifier import softmax
    from nnunet_mtl.training.subtype_fit import fit_classifier, load_records

    details = read_details(preds)
    truth = truth_subtypes(phantom_test)
    cases = sorted(details)
    y = np.array([truth[c] for c in cases])
    variants: dict[str, np.ndarray] = {}
    variants["cnn_raw"] = np.array([softmax(np.mean(details[c]["fold_logits"], axis=0)) for c in cases])
    for name in ("cnn", "features", "fused"):
        if all(name in details[c]["probabilities"] for c in cases):
            variants[name] = np.array([details[c]["probabilities"][name] for c in cases])
        elif name == "features":  # cases without a lesion have no feature opinion: fall back to the head
            variants[name] = np.array([details[c]["probabilities"].get(name, details[c]["probabilities"]["cnn"])
                                       for c in cases])
    if (model / "fold_0").is_dir():
        records = load_records(model / "fold_0")
    else:  # a cross-validation ensemble: every training case once, predicted by the fold that did not train on it
        records = {"train": [], "validation": [r for fold in sorted(model.glob("fold_*"))
                                                for r in load_records(fold).get("validation", [])]}
    names = [f"subtype{k}" for k in range(3)]
    for kind in refits:
        feature_kind, _, subset = kind.partition(":")
        fit = records["train"]
        held = records["validation"]
        if subset:
            prefixes = tuple(subset.split("+"))

            def keep(r, prefixes=prefixes):
                if not r.get("features"):
                    return r
                return {**r, "features": subset_of(r["features"], prefixes)}

            fit, held = [keep(r) for r in fit], [keep(r) for r in held]
        classifier = fit_classifier(fit, held, names, feature_kind, "bench refit")
        rows, fused = [], []
        for c in cases:
            features = details[c]["features"]
            if features and subset:
                features = subset_of(features, prefixes)
            got = classifier.probabilities(details[c]["fold_logits"], features)
            rows.append(got.get("features", got["cnn"]))
            fused.append(got.get("fused", got["cnn"]))
        variants[f"refit:{kind}:features"] = np.array(rows)
        variants[f"refit:{kind}:fused(w={classifier.fusion_weight})"] = np.array(fused)
    # the two-feature intensity model, on true and on predicted lesions
    key = str(phantom_train)
    if key not in true_moments_cache:
        true_moments_cache[key] = true_lesion_moments(phantom_train, ("train", "validation"))
    train_true = true_moments_cache[key]
    model_true = two_feature_model([v[0] for v in train_true.values()], [v[1] for v in train_true.values()])
    test_key = str(phantom_test) + ":test"
    if test_key not in true_moments_cache:
        true_moments_cache[test_key] = true_lesion_moments(phantom_test, ("test",))
    test_true = true_moments_cache[test_key]
    variants["hu2_true_masks"] = model_true.predict_proba([test_true[c][0] for c in cases])
    train_pred = [(moments_of(r["features"]), r["subtype"]) for r in records["train"] + records["validation"]
                  if r.get("features")]
    model_pred = two_feature_model([m for m, _ in train_pred], [s for _, s in train_pred])
    prior = np.bincount([s for _, s in train_pred], minlength=3) / len(train_pred)
    variants["hu2_predicted_masks"] = np.array([model_pred.predict_proba([moments_of(details[c]["features"])])[0]
                                                if details[c]["features"] else prior for c in cases])
    found = np.array([details[c]["lesion_found"] for c in cases])
    results = {}
    for name, p in variants.items():
        results[name] = {"macro_f1": bootstrap(y, p, macro_f1), "balanced_accuracy": bootstrap(y, p, balanced_accuracy),
                         "ece": bootstrap(y, p, ece), "n": len(y),
                         "found_right": f"{int(((p.argmax(1) == y) & found).sum())}/{int(found.sum())}",
                         "y": y.tolist(), "probabilities": p.tolist()}
    return results


def paired_difference(first: dict, second: dict, statistic) -> tuple[float, float, float]:
    """(second - first, 2.5 %, 97.5 %) of ``statistic`` over the same resampled cases (one training: cases only)."""
    both = np.stack([np.array(first["probabilities"]), np.array(second["probabilities"])], axis=1)
    return bootstrap(np.array(first["y"]), both, lambda y, pq: statistic(y, pq[:, 1]) - statistic(y, pq[:, 0]))


def variant_named(variants: dict, name: str) -> dict | None:
    """A variant by its name or the start of it (refits carry their fusion weight: ``refit:lda:fused(w=0.3)``)."""
    return variants.get(name) or next((v for k, v in variants.items() if k.startswith(name)), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("work_classification"))
    parser.add_argument("--train-sites", nargs="+", default=["A", "B"])
    parser.add_argument("--test-sites", nargs="+", default=list(SITES_DEFAULT))
    parser.add_argument("--n-test", type=int, default=150, help="test cases per site (default 150)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--refit", nargs="*", default=[],
                        help="offline feature-model refits to score too: lda | logistic, optionally ':prefix+prefix' "
                             "to keep feature groups, e.g. lda:lesion.stat_+contrast.")
    parser.add_argument("--ablation", default="", help="tag of a training ablation (see ABLATIONS)")
    parser.add_argument("--training", type=int, default=1, metavar="N",
                        help="the Nth training of the same recipe (default 1): N >= 2 trains and predicts again "
                             "under its own tag, so an arm holds several trainings (training noise is as large as "
                             "most levers)")
    parser.add_argument("--folds", nargs="+", default=["0"], metavar="FOLD",
                        help="train these folds (default 0, the published split); several, e.g. 1 2 3 4 5: the "
                             "cross-validation ensemble, tagged _cv<n>, predicting with all of them")
    parser.add_argument("--train-only", action="store_true", help="stop after training")
    parser.add_argument("--paired", nargs=2, action="append", default=[], metavar=("FIRST", "SECOND"),
                        help="also print SECOND - FIRST (variant names, or their start) with a paired bootstrap over "
                             "the same cases; repeatable")
    parser.add_argument("--json", type=Path, help="write all numbers here")
    args = parser.parse_args()
    if args.refit and args.folds != ["0"]:
        parser.error("--refit refits from fold 0's training records; a cross-validation ensemble has none")

    os.environ.setdefault("nnUNet_def_n_proc", "2")
    os.environ.setdefault("nnUNet_n_proc_DA", "2")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if any("+" in s for s in args.test_sites):
        parser.error("a pool (A+B) trains; test on its sites one by one")
    sites = sorted(set(args.train_sites) | set(args.test_sites))
    phantoms = make_phantoms(args.workdir.resolve(), sites, args.n_test, args.seed)
    extra = ABLATIONS[args.ablation] if args.ablation else None
    tag = (f"_{args.ablation}" if args.ablation else "") + (f"_cv{len(args.folds)}" if args.folds != ["0"] else "") \
        + (f"_t{args.training}" if args.training > 1 else "")
    table, cache = {}, {}
    for train in args.train_sites:
        model = train_site(args.workdir.resolve(), train, phantoms[train], args.epochs, args.iterations, tag, extra,
                           tuple(args.folds))
        if args.train_only:
            continue
        for test in args.test_sites:
            preds = predict_site(model, phantoms[test], args.workdir.resolve() / f"preds_{train}{tag}_on_{test}")
            table[f"{train}{tag}->{test}"] = score_pair(model, phantoms[train], phantoms[test], preds, args.refit,
                                                        cache)
    print(f"\nsubtype on phantom sites ({args.n_test} test cases each; 95 % bootstrap intervals over cases)")
    print(f"{'train->test':<14}{'variant':<34}{'macro-F1':>22}{'balanced acc':>22}{'ECE':>22}{'found right':>13}")
    for pair, variants in table.items():
        for name, r in variants.items():
            cells = "".join(f"{r[k][0]:>8.3f} [{r[k][1]:.3f}, {r[k][2]:.3f}]"
                            for k in ("macro_f1", "balanced_accuracy", "ece"))
            print(f"{pair:<14}{name:<34}{cells}{r['found_right']:>13}")
        print()
    for first, second in args.paired:
        print(f"paired: {second} - {first} (same cases, {BOOTSTRAP} resamples)")
        for pair, variants in table.items():
            a, b = variant_named(variants, first), variant_named(variants, second)
            if a and b:
                differences = (("macro-F1", paired_difference(a, b, macro_f1)), ("ECE", paired_difference(a, b, ece)))
                cells = "   ".join(f"{label} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for label, (d, lo, hi) in differences)
                print(f"  {pair:<14}{cells}")
        print()
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


# Training ablations for "why does the head drop on shifted data" (each a TrainSettings change).
ABLATIONS: dict[str, dict] = {
    "predicted_attention": {"attend_to_true_lesion": False},  # the head attends to the decoder's lesion in training
    "head_full_lr": {"head_lr_scale": 1.0},  # the head at the body's learning rate
    "scanner_aug": {"intensity_augmentation": "scanner"},  # contrast-timing, HU-offset and noise augmentation
    "rerun": {},  # the baseline recipe trained again: how far training noise alone moves the numbers
    "thick_slices": {"thick_slice_mm": 4.0},  # half the patches as if on slices up to 4 mm (site A: about 2 mm)
    "lesion_contrast": {"lesion_contrast_augmentation": True},  # each lesion's contrast with the gland x0.35-1.1
    "mirror": {"mirror_augmentation": True},  # nnU-Net's mirroring augmentation on (the demo recipe has it off)
    "small_lesions": {"small_lesion_oversampling": 4.0},  # cases with a lesion under 1 ml drawn up to 4x as often
    "lesion_weight": {"lesion_loss_weight": 3.0},  # lesion voxels weigh 3x in the segmentation cross-entropy
    "long": {"epochs": 80},  # the demo recipe trained 2.5x as long: what the demo's short budget costs
    "long_small_lesions": {"epochs": 80, "small_lesion_oversampling": 4.0},  # both, at the longer budget
    # fainter lesions at the longer budget; its trainings of 2026-12-02 (before MovedLesionLog) also fed the patches
    # whose lesion contrast was moved to the subtype loss; "..._unmoved" is the same recipe after that change
    "long_lesion_contrast": {"epochs": 80, "lesion_contrast_augmentation": True},
    "long_lesion_contrast_unmoved": {"epochs": 80, "lesion_contrast_augmentation": True},
    # the head also reads the gland around the lesion (its intensity, the lesion's contrast with it)
    "long_context": {"epochs": 80, "head": "lesion_context"},
    # half the lesion patches show the head a badly drawn lesion (cut by a plane, blended with the decoder's own)
    "long_imperfect_attention": {"epochs": 80, "imperfect_attention": 0.5},
    # a larger in-plane field of view (the demo's 24 x 48 x 48 sees a fifth of site A's 109 x 127 crop in-plane)
    "long_patch64": {"epochs": 80, "demo_patch": (24, 64, 64)},
}


if __name__ == "__main__":
    sys.exit(main())
