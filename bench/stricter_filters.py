"""Stricter false-lesion filters on top of each model's own, recomputed from ``nnunet-mtl evaluate``'s tables.

A filter removes whole predicted lesion components (those smaller than a volume or with a lower lesion probability
score), and removing one component changes no other component's match. So lesion-wise sensitivity and false
lesions per case after an extra filter follow exactly from ``metrics_per_lesion.csv`` (every predicted component
with its volume, score and status, and every true lesion with the components that match it). No prediction is
needed. The evaluations are the ones ``bench/arms.py`` writes (``<workdir>/eval_preds_<run>_on_<site>``).

  python bench/stricter_filters.py --workdir work_cls --arm baseline A A_rerun --arm new A_x A_x_t2 --sites A B
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

MIN_ML = 0.1  # the sensitivity counted is for true lesions of at least this volume (issue 17's bar)
DEFAULT_FILTERS = ("0,0", "0.1,0", "0,0.95", "0,0.98", "0.1,0.98")


def sensitivity_and_false(table: Path, min_volume_ml: float, min_score: float) -> tuple[float, float]:
    """(sensitivity for true lesions >= MIN_ML, false lesions per case) after removing predicted components smaller
    than ``min_volume_ml`` or scored below ``min_score``."""
    with table.open() as f:
        rows = list(csv.DictReader(f))
    with (table.parent / "metrics_per_case.csv").open() as f:  # every evaluated case, with or without lesions
        cases = {r["case"] for r in csv.DictReader(f)}
    kept = {(r["case"], r["index"]) for r in rows if r["kind"] == "predicted"
            and float(r["volume_ml"]) >= min_volume_ml and float(r["score"] or 0) >= min_score}
    false = sum(r["status"] == "false_positive" and (r["case"], r["index"]) in kept
                for r in rows if r["kind"] == "predicted")
    truth = [r for r in rows if r["kind"] == "true" and float(r["volume_ml"]) >= MIN_ML]
    found = sum(any((r["case"], m) in kept for m in r["matched"].replace(";", " ").split()) for r in truth)
    return found / max(len(truth), 1), false / max(len(cases), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--arm", nargs="+", action="append", required=True, metavar=("NAME", "RUN"),
                        help="an arm's name, then its runs (site-tag of bench/classification.py)")
    parser.add_argument("--sites", nargs="+", default=["A", "B"])
    parser.add_argument("--filters", nargs="+", default=list(DEFAULT_FILTERS), metavar="ML,P",
                        help="extra filters: minimum component volume in ml, minimum score (default: %(default)s)")
    args = parser.parse_args()
    filters = [tuple(float(x) for x in f.split(",")) for f in args.filters]
    for site in args.sites:
        print(f"\nsite {site}: lesions >= {MIN_ML:g} ml found / false lesions per case, after each extra filter")
        runs = [(arm[0], run) for arm in args.arm for run in arm[1:]]
        width = max(len(f"{name}:{run}") for name, run in runs) + 2
        print(f"{'min ml, min score':<19}" + "".join(f"{f'{name}:{run}':>{width}}" for name, run in runs)
              + "".join(f"{f'{arm[0]} (mean)':>26}" for arm in args.arm))
        for volume, score in filters:
            values = {}
            for name, run in runs:
                table = args.workdir / f"eval_preds_{run}_on_{site}" / "metrics_per_lesion.csv"
                if not table.is_file():
                    raise SystemExit(f"{table} not found: run bench/arms.py (or nnunet-mtl evaluate) first")
                values[(name, run)] = sensitivity_and_false(table, volume, score)
            means = []
            for arm in args.arm:
                pairs = [values[(arm[0], run)] for run in arm[1:]]
                means.append(tuple(sum(v[k] for v in pairs) / len(pairs) for k in (0, 1)))
            print(f"{f'{volume:g}, {score:g}':<19}"
                  + "".join(f"{f'{s:.3f} / {f:.2f}':>{width}}" for s, f in values.values())
                  + "".join(f"{f'{s:.3f} / {f:.2f}':>26}" for s, f in means))
    return 0


if __name__ == "__main__":
    sys.exit(main())
