"""The task's output files: ``subtype_results.csv`` (header exactly ``Names,Subtype``), per-class probabilities,
and ``subtype_details.json`` (every classifier variant, the lesion the subtype describes and its features).

All are rewritten whole (temporary name, then rename) after each case, so an interrupted run leaves valid files
that list exactly the finished cases.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

SUBTYPE_CSV = "subtype_results.csv"
PROBABILITY_CSV = "subtype_probabilities.csv"
DETAILS_JSON = "subtype_details.json"
MASK_ENDING = ".nii.gz"


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def case_details(subtype) -> dict:
    """The JSON-ready record of a :class:`~nnunet_mtl.inference.subtype.CaseSubtype`."""
    variants = {k: [float(x) for x in v] for k, v in subtype.variants.items()}
    return {"variant": subtype.variant, "probabilities": variants,
            "fold_logits": None if subtype.fold_logits is None else np.asarray(subtype.fold_logits).tolist(),
            "lesion_found": subtype.lesion_found, "lesion_ml": round(float(subtype.lesion_ml), 5),
            "features": subtype.features}


def read_details(out_dir: Path) -> dict[str, dict]:
    path = out_dir / DETAILS_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


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
    results = ["Names,Subtype"] + [f"{c}{MASK_ENDING},{int(np.argmax(probabilities[c]))}" for c in cases]
    header = ["Names", "Subtype"] + [f"prob_{i}" for i in range(n_classes)] + extra_columns
    rows = [",".join(header)]
    for c in cases:
        p = probabilities[c]
        rows.append(",".join([f"{c}{MASK_ENDING}", str(int(np.argmax(p)))] + [f"{float(v):.6f}" for v in p]
                             + [str(extra[c][k]) for k in extra_columns]))
    write_atomic_text(out_dir / SUBTYPE_CSV, "\n".join(results) + "\n")
    write_atomic_text(out_dir / PROBABILITY_CSV, "\n".join(rows) + "\n")
    if details is not None:
        write_atomic_text(out_dir / DETAILS_JSON, json.dumps({c: details[c] for c in sorted(details)}) + "\n")


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
