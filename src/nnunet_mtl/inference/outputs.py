"""The task's output files: ``subtype_results.csv`` (header exactly ``Names,Subtype``), per-class probabilities,
and ``subtype_details.json`` (every classifier variant, the lesion the subtype describes and its features).

All are rewritten whole (temporary name, then rename) after each case, so an interrupted run leaves valid files
that list exactly the finished cases. They are written and read with the ``csv`` module, UTF-8: a case name with a
comma, a quote or a line break is quoted, so every name round-trips.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from nnunet_mtl.tempfiles import temp_path

SUBTYPE_CSV = "subtype_results.csv"
PROBABILITY_CSV = "subtype_probabilities.csv"
DETAILS_JSON = "subtype_details.json"
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


def write_text_atomic(path: Path, text: str) -> None:
    """Text (UTF-8) under a temporary name, then renamed."""
    tmp = temp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def case_details(subtype) -> dict:
    """The JSON-ready record of a :class:`~nnunet_mtl.inference.subtype.CaseSubtype`."""
    variants = {k: [float(x) for x in v] for k, v in subtype.variants.items()}
    return {"variant": subtype.variant, "probabilities": variants,
            "fold_logits": None if subtype.fold_logits is None else np.asarray(subtype.fold_logits).tolist(),
            "lesion_found": subtype.lesion_found, "lesion_ml": round(float(subtype.lesion_ml), 5),
            "features": subtype.features}


def read_details(out_dir: Path, problems: list[str] | None = None) -> dict[str, dict]:
    """subtype_details.json of an earlier run (empty when absent; when it cannot be read, empty and said in
    ``problems``, so its cases are predicted again)."""
    path = out_dir / DETAILS_JSON
    if not path.is_file():
        return {}
    try:
        details = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(details, dict):
            raise ValueError("not a JSON object")
        return details
    except (OSError, UnicodeDecodeError, ValueError) as e:
        if problems is not None:
            problems.append(f"{path}: cannot be read ({e}); its cases are predicted again")
        return {}


def write_subtype_tables(out_dir: Path, probabilities: Mapping[str, np.ndarray],
                         extra: Mapping[str, Mapping[str, object]] | None = None,
                         details: Mapping[str, dict] | None = None) -> None:
    """Write both tables for the cases given (case id -> class probabilities), sorted by case id, and the details
    (subtype_details.json) when given.

    ``extra`` (case id -> {column: value}) adds columns after the probabilities of subtype_probabilities.csv only
    (predict's lesion_found, lesion_volume_ml, lesion_probability); subtype_results.csv stays ``Names,Subtype``.
    """
    cases = sorted(probabilities)
    n_classes = len(next(iter(probabilities.values()))) if cases else 0
    extra_columns = list(next(iter(extra.values()))) if extra else []
    subtypes = {c: int(np.argmax(probabilities[c])) for c in cases}
    write_csv_atomic(out_dir / SUBTYPE_CSV, [["Names", "Subtype"], *([f"{c}{MASK_ENDING}", subtypes[c]]
                                                                   for c in cases)])
    header = ["Names", "Subtype"] + [f"prob_{i}" for i in range(n_classes)] + extra_columns
    write_csv_atomic(out_dir / PROBABILITY_CSV, [header, *([f"{c}{MASK_ENDING}", subtypes[c],
                                                            *(f"{float(v):.6f}" for v in probabilities[c]),
                                                            *(extra[c][k] for k in extra_columns)]
                                                           for c in cases)])
    if details is not None:
        write_text_atomic(out_dir / DETAILS_JSON, json.dumps({c: details[c] for c in sorted(details)}) + "\n")


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
    n_classes = sum(name.startswith("prob_") for name in header)  # predict's lesion columns may follow them
    if n_classes < 1 or header[:2 + n_classes] != ["Names", "Subtype"] + [f"prob_{i}" for i in range(n_classes)]:
        notes.append(f"{path}: header {','.join(header)!r} is not Names,Subtype,prob_0,...; every case is "
                     "predicted again")
        return {}
    table = {}
    for line, row in enumerate(rows[1:], start=2):
        try:
            if len(row) != len(header) or not row[0].endswith(MASK_ENDING):
                raise ValueError(f"{len(row)} fields, expected {len(header)} with a name ending {MASK_ENDING}")
            values = np.array([float(v) for v in row[2:2 + n_classes]])
            if not np.isfinite(values).all():
                raise ValueError("non-finite probability")
        except ValueError as e:
            notes.append(f"{path} line {line}: {e}; that case is predicted again")
            continue
        table[row[0].removesuffix(MASK_ENDING)] = values
    return table
