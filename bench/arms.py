"""Two recipes ("arms"), several trainings each, compared on the same phantom test cases of each site.

Two trainings of one recipe differ by 0.07-0.10 cross-site macro-F1 (docs/measurements-classification.md), as much
as most levers move it, so a lever is judged on several trainings per arm, and its interval has to carry both
sources of noise. The interval here is a paired hierarchical bootstrap: each resample draws the test cases with
replacement (the same cases for both arms) and, for each arm, one of its trainings at random; the difference of the
arms' figures over 2000 resamples gives the 95 % interval.

Per training it reads what `bench/classification.py --workdir W [--ablation X] [--training N]` left in W:
``preds_<site-tag>_on_<site>`` (predictions, subtype_details.json) and scores lesions with `nnunet-mtl evaluate`
(cached in ``eval_preds_...``). Figures: subtype macro-F1 and ECE of a classifier variant (default fused, the
product's), lesion-wise sensitivity for lesions of 0.1 ml and more (IoU > 0.1), false lesions per case, case-mean
lesion Dice.

  python bench/arms.py --workdir /work/bench_cls --arm baseline A A_rerun --arm thick A_thick_slices \
      A_thick_slices_t2 A_thick_slices_t3 --sites A B

``--ensemble`` with one arm compares it with the average of its trainings' subtype probabilities (what `predict`
does over folds): subtype figures only, the lesion columns of the ensemble print nan (its masks were not made).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classification import ece, macro_f1, truth_subtypes  # noqa: E402

RESAMPLES = 2000
MIN_ML = 0.1
FIGURES = ("macro_f1", "ece", "sensitivity", "false_per_case", "lesion_dice")


def evaluated(workdir: Path, run: str, site: str) -> Path:
    """``nnunet-mtl evaluate`` of one training's predictions on one site (run once, then cached)."""
    preds, out = workdir / f"preds_{run}_on_{site}", workdir / f"eval_preds_{run}_on_{site}"
    if not (out / "metrics_per_lesion.csv").is_file():
        print(f"== evaluate {preds.name}", flush=True)
        subprocess.run([sys.executable, "-m", "nnunet_mtl", "evaluate", "--pred", str(preds), "--truth",
                        str(workdir / f"phantom_{site}" / "test_groundtruth"), "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
    return out


def per_case(workdir: Path, run: str, site: str, variant: str) -> dict[str, dict]:
    """Per test case: true subtype, the variant's probabilities, true lesions of >= MIN_ML and how many were found,
    false lesions, lesion Dice."""
    from nnunet_mtl.inference.outputs import read_details

    details = read_details(workdir / f"preds_{run}_on_{site}")
    truth = truth_subtypes(workdir / f"phantom_{site}")
    folder = evaluated(workdir, run, site)
    cases = {c: {"y": truth[c], "p": np.array(details[c]["probabilities"][variant]), "lesions": 0, "found": 0,
                 "false": 0} for c in details}
    with (folder / "metrics_per_lesion.csv").open() as f:
        for row in csv.DictReader(f):
            case = cases[row["case"]]
            if row["kind"] == "true" and float(row["volume_ml"]) >= MIN_ML:
                case["lesions"] += 1
                case["found"] += row["status"] == "detected"
            elif row["kind"] == "predicted" and row["status"] == "false_positive":
                case["false"] += 1
    with (folder / "metrics_per_case.csv").open() as f:
        for row in csv.DictReader(f):
            cases[row["case"]]["dice"] = float(row["dice_lesion"])
    return cases


def figures(run: dict[str, dict], cases: list[str]) -> dict[str, float]:
    y = np.array([run[c]["y"] for c in cases])
    p = np.stack([run[c]["p"] for c in cases])
    lesions = sum(run[c]["lesions"] for c in cases)
    return {"macro_f1": macro_f1(y, p), "ece": ece(y, p),
            "sensitivity": sum(run[c]["found"] for c in cases) / max(lesions, 1),
            "false_per_case": sum(run[c]["false"] for c in cases) / len(cases),
            "lesion_dice": float(np.mean([run[c]["dice"] for c in cases]))}


def compare(arms: dict[str, list[dict[str, dict]]], seed: int = 0) -> dict:
    """Each arm's figures per training, their mean, and the paired hierarchical bootstrap of the difference of the
    second arm's mean from the first's."""
    names = list(arms)
    cases = sorted(set.intersection(*(set(run) for runs in arms.values() for run in runs)))
    result = {"cases": len(cases), "arms": {}}
    for name, runs in arms.items():
        per_run = [figures(run, cases) for run in runs]
        result["arms"][name] = {"trainings": per_run,
                                "mean": {k: float(np.mean([r[k] for r in per_run])) for k in FIGURES}}
    if len(names) == 2:
        rng = np.random.default_rng(seed)
        diffs = {k: [] for k in FIGURES}
        for _ in range(RESAMPLES):
            drawn = [cases[i] for i in rng.integers(0, len(cases), len(cases))]
            a = figures(arms[names[0]][rng.integers(len(arms[names[0]]))], drawn)
            b = figures(arms[names[1]][rng.integers(len(arms[names[1]]))], drawn)
            for k in FIGURES:
                diffs[k].append(b[k] - a[k])
        result["difference"] = {k: [result["arms"][names[1]]["mean"][k] - result["arms"][names[0]]["mean"][k],
                                    *np.percentile(diffs[k], [2.5, 97.5]).tolist()] for k in FIGURES}
    return result


def ensemble(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """The trainings' subtype probabilities averaged per case; no masks, so no lesion figures (nan)."""
    return {c: {**runs[0][c], "p": np.mean([run[c]["p"] for run in runs], axis=0), "lesions": 1,
                "found": float("nan"), "false": float("nan"), "dice": float("nan")} for c in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="bench/classification.py's workdir")
    parser.add_argument("--arm", nargs="+", action="append", required=True, metavar=("NAME", "RUN"),
                        help="an arm's name and its trainings' tags (preds_<RUN>_on_<site>); give two arms")
    parser.add_argument("--sites", nargs="+", default=["A", "B"])
    parser.add_argument("--variant", default="fused", help="classifier variant (default fused)")
    parser.add_argument("--ensemble", action="store_true",
                        help="with one arm: compare it with the average of its trainings' subtype probabilities")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if any(len(arm) < 2 for arm in args.arm):
        parser.error("each --arm needs a name and at least one training tag")
    if args.ensemble and (len(args.arm) != 1 or len(args.arm[0]) < 3):
        parser.error("--ensemble takes one arm of at least two trainings")
    table = {}
    for site in args.sites:
        arms = {arm[0]: [per_case(args.workdir, run, site, args.variant) for run in arm[1:]] for arm in args.arm}
        if args.ensemble:
            name, runs = next(iter(arms.items()))
            arms[f"{name}_ensemble"] = [ensemble(runs)]
        table[site] = compare(arms)
        r = table[site]
        print(f"\nsite {site}: {r['cases']} test cases, variant {args.variant}")
        print(f"  {'arm':<12}{'trainings':>10}" + "".join(f"{k:>16}" for k in FIGURES))
        for name, arm in r["arms"].items():
            print(f"  {name:<12}{len(arm['trainings']):>10}" + "".join(f"{arm['mean'][k]:>16.3f}" for k in FIGURES))
            for i, run in enumerate(arm["trainings"]):
                print(f"  {'':<12}{'#' + str(i + 1):>10}" + "".join(f"{run[k]:>16.3f}" for k in FIGURES))
        if "difference" in r:
            print(f"  {'difference':<22}" + "".join(f"{d[0]:>+16.3f}" for d in r["difference"].values()))
            intervals = (f"[{d[1]:+.3f},{d[2]:+.3f}]" for d in r["difference"].values())
            print(f"  {'95 % interval':<22}" + "".join(f"{i:>16}" for i in intervals))
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
