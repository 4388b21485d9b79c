"""The task's output files: ``subtype_results.csv`` (header exactly ``Names,Subtype``) and per-class probabilities.

Both are rewritten whole (temporary name, then rename) after each case, so an interrupted run leaves valid files
that list exactly the finished cases.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

SUBTYPE_CSV = "subtype_results.csv"
PROBABILITY_CSV = "subtype_probabilities.csv"
MASK_ENDING = ".nii.gz"


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_subtype_tables(out_dir: Path, probabilities: Mapping[str, np.ndarray],
                         extra: Mapping[str, Mapping[str, object]] | None = None) -> None:
    """Write both tables for the cases given (case id -> class probabilities), sorted by case id.

    ``extra`` (case id -> {column: value}) adds columns after the probabilities of subtype_probabilities.csv only
    (predict's lesion_found, lesion_volume_ml, lesion_probability); subtype_results.csv stays ``Names,Subtype``.
    """
    cases = sorted(probabilities)
    n_classes = len(next(iter(probabilities.values()))) if cases else 0
    extra_columns = list(next(iter(extra.values()))) if extra else []
    results = ["Names,Subtype"] + [f"{c}{MASK_ENDING},{int(np.argmax(probabilities[c]))}" for c in cases]
    header = ["Names", "Subtype"] + [f"prob_{i}" for i in range(n_classes)] + extra_columns
    rows = [",".join(header)]
    for c in cases:
        p = probabilities[c]
        rows.append(",".join([f"{c}{MASK_ENDING}", str(int(np.argmax(p)))] + [f"{float(v):.6f}" for v in p]
                             + [str(extra[c][k]) for k in extra_columns]))
    write_atomic_text(out_dir / SUBTYPE_CSV, "\n".join(results) + "\n")
    write_atomic_text(out_dir / PROBABILITY_CSV, "\n".join(rows) + "\n")


def read_probability_table(out_dir: Path) -> dict[str, np.ndarray]:
    """Probabilities of the cases already finished in an earlier run (empty when there is no table)."""
    path = out_dir / PROBABILITY_CSV
    if not path.is_file():
        return {}
    table = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            case = row["Names"].removesuffix(MASK_ENDING)
            table[case] = np.array([float(row[k]) for k in row if k.startswith("prob_")])
    return table
