"""Prediction split across machines: ``predict --num-parts N --part-id K``, gathered by ``submission``.

nnU-Net's semantics (``nnUNetv2_predict -num_parts N -part_id K``): the folder's cases, sorted, and part K takes
every N-th case starting at K, so the parts are disjoint and together complete, whatever machine runs which part.

Every part writes its masks into the shared output folder (the names never clash) and keeps its subtype tables and
a manifest in its own folder, ``OUT/parts/part_K_of_N/``, so parts running at the same time never rewrite one
another's files. The manifest names the whole folder's case list (each part lists the input folder itself), the
part's cases, the finished ones and the failures, and says ``complete`` only once every case of the part has its
mask and subtype. ``submission`` gathers the parts: it refuses a set with a part missing or unfinished, parts of
different splits, folders or prediction settings, and otherwise writes the merged tables beside the masks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_mtl.inference.lesion_candidates import (
    CANDIDATES_CSV,
    Candidate,
    lesion_facts,
    read_candidates_table,
    write_candidates_table,
)
from nnunet_mtl.inference.outputs import (
    MASK_ENDING,
    read_details,
    read_probability_table,
    write_subtype_tables,
    write_text_atomic,
)

PARTS_FOLDER = "parts"
MANIFEST = "manifest.json"
_PART_NAME = re.compile(r"part_(\d+)_of_(\d+)")


class IncompleteParts(ValueError):
    """The parts found in a prediction folder do not add up to the whole folder of cases."""


@dataclass(frozen=True)
class Part:
    """Part ``part_id`` (0-based) of ``num_parts``."""

    num_parts: int
    part_id: int

    def __post_init__(self) -> None:
        if self.num_parts < 1:
            raise ValueError(f"--num-parts must be at least 1, got {self.num_parts}")
        if not 0 <= self.part_id < self.num_parts:
            raise ValueError(f"--part-id must be in 0..{self.num_parts - 1} for --num-parts {self.num_parts}, "
                             f"got {self.part_id}")

    @property
    def name(self) -> str:
        return f"part_{self.part_id}_of_{self.num_parts}"

    def select(self, cases: Mapping[str, Path]) -> dict[str, Path]:
        """This part's cases: sorted case ids, every ``num_parts``-th from ``part_id`` (nnU-Net's split)."""
        ids = sorted(cases)[self.part_id::self.num_parts]
        return {case: cases[case] for case in ids}

    def folder(self, output_dir: Path) -> Path:
        """Where this part keeps its subtype tables and manifest."""
        return output_dir / PARTS_FOLDER / self.name


def write_manifest(output_dir: Path, part: Part, all_cases: list[str], finished: list[str],
                   failed: Mapping[str, str], settings: Mapping[str, object]) -> None:
    """Record the part's progress (atomically); ``complete`` once every case of the part is finished."""
    mine = sorted(part.select(dict.fromkeys(all_cases, Path())))
    done = sorted(set(finished) & set(mine))
    manifest = {"num_parts": part.num_parts, "part_id": part.part_id, "all_cases": sorted(all_cases),
                "part_cases": mine, "finished": done, "failed": dict(sorted(failed.items())),
                "settings": dict(settings), "complete": done == mine and not failed}
    folder = part.folder(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def find_manifests(prediction_dir: Path) -> list[dict]:
    """The manifests of every part folder under ``prediction_dir`` (empty for a run without parts)."""
    manifests = []
    for path in sorted((prediction_dir / PARTS_FOLDER).glob(f"part_*_of_*/{MANIFEST}")):
        if not _PART_NAME.fullmatch(path.parent.name):
            continue
        try:
            manifests.append({**json.loads(path.read_text()), "_folder": path.parent})
        except (OSError, json.JSONDecodeError) as e:
            raise IncompleteParts(f"{path}: unreadable part manifest ({e}); run that part again") from None
    return manifests


def gather_parts(prediction_dir: Path, expected_cases: list[str] | None = None) -> list[str] | None:
    """Check that the parts in ``prediction_dir`` make up the whole folder, then write the merged subtype tables
    beside the masks. Returns the case ids, or None when the folder holds no parts (a single run).

    ``expected_cases`` (e.g. the test images folder's cases) must then equal the parts' case list.
    Raises :class:`IncompleteParts` naming every missing or unfinished part and case.
    """
    manifests = find_manifests(prediction_dir)
    if not manifests:
        return None
    splits = {m["num_parts"] for m in manifests}
    if len(splits) > 1:
        raise IncompleteParts(f"{prediction_dir}: parts of different splits ({sorted(splits)} parts); predict into "
                              "a fresh folder with one --num-parts, or remove the other parts' folders")
    num_parts = splits.pop()
    all_cases = manifests[0]["all_cases"]
    problems = []
    for m in manifests[1:]:
        if m["all_cases"] != all_cases:
            problems.append(f"part {m['part_id']} of {num_parts} saw another input folder "
                            f"({len(m['all_cases'])} cases, part 0 saw {len(all_cases)})")
        if m["settings"] != manifests[0]["settings"]:
            problems.append(f"part {m['part_id']} of {num_parts} was predicted with other settings "
                            f"({m['settings']} vs {manifests[0]['settings']})")
    if expected_cases is not None and sorted(expected_cases) != all_cases:
        missing = sorted(set(expected_cases) - set(all_cases))
        extra = sorted(set(all_cases) - set(expected_cases))
        problems.append(f"the parts cover {len(all_cases)} cases, the images folder holds {len(expected_cases)}"
                        + (f"; not in the parts: {_names(missing)}" if missing else "")
                        + (f"; not in the images folder: {_names(extra)}" if extra else ""))
    present = {m["part_id"]: m for m in manifests}
    for k in range(num_parts):
        if k not in present:
            problems.append(f"part {k} of {num_parts} is missing: run `nnunet-mtl predict ... --num-parts "
                            f"{num_parts} --part-id {k}`")
            continue
        m = present[k]
        if not m["complete"]:
            left = sorted(set(m["part_cases"]) - set(m["finished"]))
            failed = f", failed: {_names(sorted(m['failed']))}" if m["failed"] else ""
            problems.append(f"part {k} of {num_parts} is unfinished ({len(m['finished'])} of "
                            f"{len(m['part_cases'])} cases; not done: {_names(left)}{failed}): run it again")
    probabilities: dict[str, np.ndarray] = {}
    details: dict[str, dict] = {}
    candidates: dict[str, list[Candidate]] = {}
    if not problems:
        for m in manifests:
            table = read_probability_table(m["_folder"])
            details.update(read_details(m["_folder"]))
            if (m["_folder"] / CANDIDATES_CSV).is_file():
                candidates.update(read_candidates_table(m["_folder"] / CANDIDATES_CSV))
            for case in m["part_cases"]:
                if case not in table:
                    problems.append(f"part {m['part_id']} of {num_parts}: {case} has no subtype row")
                elif not (prediction_dir / f"{case}{MASK_ENDING}").is_file():
                    problems.append(f"part {m['part_id']} of {num_parts}: mask {case}{MASK_ENDING} is missing")
                else:
                    probabilities[case] = table[case]
    if problems:
        raise IncompleteParts(f"{prediction_dir}: the parts do not make a complete set:\n  - "
                              + "\n  - ".join(problems))
    write_candidates_table(prediction_dir, {c: candidates.get(c, []) for c in probabilities})
    write_subtype_tables(prediction_dir, probabilities, {c: lesion_facts(candidates.get(c, [])) for c in probabilities},
                         {c: details[c] for c in probabilities if c in details})
    return all_cases


def _names(cases: list[str], limit: int = 8) -> str:
    shown = ", ".join(cases[:limit])
    return shown + (f" and {len(cases) - limit} more" if len(cases) > limit else "")
