"""The task's output files: ``subtype_results.csv`` (header exactly ``Names,Subtype``) and per-class probabilities.

Both are rewritten whole (temporary name, then rename) after each case, so an interrupted run leaves valid files
that list exactly the finished cases. They are written and read with the ``csv`` module, UTF-8: a case name with a
comma, a quote or a line break is quoted, so every name round-trips.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from nnunet_mtl.tempfiles import temp_path

SUBTYPE_CSV = "subtype_results.csv"
PROBABILITY_CSV = "subtype_probabilities.csv"
MASK_ENDING = ".nii.gz"


def write_csv_atomic(path: Path, rows: Iterable[Iterable[object]]) -> None:
    """CSV rows (UTF-8, ``\\n`` line ends, quoted where needed) under a temporary name, then renamed."""
    tmp = temp_path(path)
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerows(rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_subtype_tables(out_dir: Path, probabilities: Mapping[str, np.ndarray]) -> None:
    """Write both tables for the cases given (case id -> class probabilities), sorted by case id."""
    cases = sorted(probabilities)
    n_classes = len(next(iter(probabilities.values()))) if cases else 0
    subtypes = {c: int(np.argmax(probabilities[c])) for c in cases}
    write_csv_atomic(out_dir / SUBTYPE_CSV, [["Names", "Subtype"], *([f"{c}{MASK_ENDING}", subtypes[c]]
                                                                   for c in cases)])
    header = ["Names", "Subtype"] + [f"prob_{i}" for i in range(n_classes)]
    write_csv_atomic(out_dir / PROBABILITY_CSV, [header, *([f"{c}{MASK_ENDING}", subtypes[c],
                                                            *(f"{float(v):.6f}" for v in probabilities[c])]
                                                           for c in cases)])


def read_probability_table(out_dir: Path, problems: list[str] | None = None) -> dict[str, np.ndarray]:
    """Probabilities of the cases already finished in an earlier run (empty when there is no table).

    Rows that cannot be read (a table edited by hand or damaged) are left out, so their cases are predicted
    again; each is described in ``problems`` when a list is given.
    """
    path = out_dir / PROBABILITY_CSV
    if not path.is_file():
        return {}
    notes = problems if problems is not None else []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        notes.append(f"{path}: cannot be read ({e}); every case is predicted again")
        return {}
    header = rows[0] if rows else []
    n_classes = len(header) - 2
    if n_classes < 1 or header != ["Names", "Subtype"] + [f"prob_{i}" for i in range(n_classes)]:
        notes.append(f"{path}: header {','.join(header)!r} is not Names,Subtype,prob_0,...; every case is "
                     "predicted again")
        return {}
    table = {}
    for line, row in enumerate(rows[1:], start=2):
        try:
            if len(row) != len(header) or not row[0].endswith(MASK_ENDING):
                raise ValueError(f"{len(row)} fields, expected {len(header)} with a name ending {MASK_ENDING}")
            values = np.array([float(v) for v in row[2:]])
            if not np.isfinite(values).all():
                raise ValueError("non-finite probability")
        except ValueError as e:
            notes.append(f"{path} line {line}: {e}; that case is predicted again")
            continue
        table[row[0].removesuffix(MASK_ENDING)] = values
    return table
