"""Mutation testing as the measure of the test suite: the kill rate per module after `mutmut run`.

`make mutation` runs mutmut 3 (configured in pyproject.toml, [tool.mutmut]) and then this script, which reads
mutmut's results (mutants/**/*.meta) and prints, per module, how many mutants the tests killed, which survived, and
whether the module reaches the bar (85 %). Only the subtype aggregation of inference/predictor.py is counted there
(``aggregate_subtype_logits``, ``lesion_centre``): the rest of that module needs a trained model, which the fast
test selection does not build. A surviving mutant whose name appears in docs/measurements-mutation.md is marked
"explained" (an equivalent mutant, with its one-line reason there); it still counts as a survivor.

Statuses: killed (a test failed), timeout and segfault (counted as killed: the mutant hung or crashed the tests),
survived (every test passed), no tests (no selected test runs the function: counted as survived).

    python bench/mutation.py [--root .] [--bar 0.85] [--list-survivors]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODULES = {
    "evaluation/metrics.py": None,
    "inference/predictor.py": ("x_aggregate_subtype_logits__mutmut_", "x_lesion_centre__mutmut_"),
    "data/checks.py": None,
    "inference/submission.py": None,
}
KILLED = {1, 3, 36, -24, 24, 152, 255, -11, -9}  # mutmut 3.8: test failure, internal error, timeout, crash
SURVIVED = {0, 5, 33}  # all tests passed; no test covers the function


def module_results(root: Path, module: str, only: tuple[str, ...] | None) -> dict[str, int | None]:
    meta = root / "mutants" / "src" / "nnunet_mtl" / f"{module}.meta"
    if not meta.is_file():
        raise SystemExit(f"{meta} not found: run `mutmut run` (or `make mutation`) first")
    results = json.loads(meta.read_text())["exit_code_by_key"]
    return {k: v for k, v in results.items() if only is None or any(part in k for part in only)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("."), help="project root holding mutants/ (default .)")
    parser.add_argument("--bar", type=float, default=0.85, help="kill rate each module must reach (default 0.85)")
    parser.add_argument("--list-survivors", action="store_true", help="print every surviving mutant's name")
    args = parser.parse_args()
    notes = args.root / "docs" / "measurements-mutation.md"
    explained = notes.read_text() if notes.is_file() else ""

    print(f"{'module':<26} {'mutants':>7} {'killed':>7} {'survived':>8} {'not run':>7} {'kill rate':>9}  bar")
    all_met = True
    for module, only in MODULES.items():
        results = module_results(args.root, module, only)
        killed = [k for k, v in results.items() if v in KILLED]
        survived = sorted(k for k, v in results.items() if v in SURVIVED)
        not_run = [k for k, v in results.items() if v not in KILLED | SURVIVED]  # not checked, skipped, segfault
        counted = len(killed) + len(survived)
        rate = len(killed) / counted if counted else 0.0
        met = counted > 0 and not not_run and rate >= args.bar
        all_met &= met
        print(f"{module:<26} {len(results):>7} {len(killed):>7} {len(survived):>8} {len(not_run):>7} "
              f"{rate:>8.1%}  {'met' if met else 'NOT met'}")
        if args.list_survivors:
            for name in survived:
                print(f"    survived{' (explained)' if name in explained else ''}: {name}")
    return 0 if all_met else 1


if __name__ == "__main__":
    sys.exit(main())
