"""Check a dataset and write it into nnU-Net's raw format (SPEC section 2).

Two layouts feed one writer. Scanning (:func:`scan_published`, :func:`scan_generic`) turns a layout into a
:class:`Source`: the cases found plus every layout problem. :func:`import_dataset` then reads every file, collects
all content problems too, and only when there are none moves a complete ``Dataset<NNN>_<name>`` folder into
``nnUNet_raw`` (built in a hidden temporary folder beside it, so a failed import leaves nothing behind; the folder
is named after its process, and an import removes those of processes that were killed).

Layout rules: hidden files (names starting with ".") are ignored everywhere; any other unexpected file or folder
inside train/, validation/, test/ or a subtype folder is an error; other entries of the published root are ignored
with a warning.
"""

from __future__ import annotations

import csv
import filecmp
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunet_mtl import __version__
from nnunet_mtl.data.checks import clean_mask, geometry_problems
from nnunet_mtl.data.nifti import NiftiError, Volume, read_volume
from nnunet_mtl.paths import dataset_folder_name, make_dirs
from nnunet_mtl.tempfiles import owner_tag, remove_stale

PUBLISHED_CASE = re.compile(r"quiz_(?P<subtype>\d+)_(?P<number>\d+)(?P<channel>_0000)?\.nii\.gz")
PUBLISHED_TEST = re.compile(r"quiz_(?P<number>\d+)_0000\.nii\.gz")
SUBTYPE_FOLDER = re.compile(r"subtype(?P<subtype>\d+)")
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
NIFTI_ENDINGS = (".nii.gz", ".nii")
FILE_ENDING = ".nii.gz"
CHANNEL_SUFFIX = "_0000"
LABELLED_SPLITS = ("train", "validation")
DEFAULT_LABELS = ("background", "pancreas", "lesion")
DEFAULT_NAME = "Pancreas"
DEFAULT_CHANNEL = "CT"
DEFAULT_FOLDS = 5
DEFAULT_SEED = 12345


class DatasetImportError(ValueError):
    """Raised with every problem found, so the user can fix them all in one round."""

    def __init__(self, problems: list[str], notes: Sequence[str] = ()) -> None:
        self.problems = problems
        self.notes = list(notes)
        super().__init__(f"{len(problems)} problem(s), nothing was written:\n"
                         + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Case:
    """One case as found on disk; ``mask`` and ``subtype`` are None for test images."""

    case_id: str
    split: str
    image: Path
    mask: Path | None = None
    subtype: int | None = None


@dataclass
class Source:
    """A scanned layout: cases by id, class names by index, and what is wrong with the layout itself."""

    base: Path
    split_given: bool = True
    cases: dict[str, Case] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def show(self, path: Path) -> str:
        """Paths in messages relative to the dataset root: short, and still unambiguous."""
        try:
            return str(path.relative_to(self.base))
        except ValueError:
            return str(path)

    def problem(self, path: Path, what: str) -> None:
        self.problems.append(f"{self.show(path)}: {what}")

    def add(self, case: Case) -> None:
        first = self.cases.get(case.case_id)
        if first is not None:
            self.problems.append(f"duplicate case id {case.case_id}: {self.show(first.image)} and "
                                 f"{self.show(case.image)}")
        else:
            self.cases[case.case_id] = case

    def add_labelled(self, case_id: str, split: str, subtype: int, image: Path | None, mask: Path | None,
                     image_hint: str, mask_hint: str) -> None:
        if image is None and mask is not None:
            self.problem(mask, f"mask without image (expected {image_hint})")
        elif mask is None and image is not None:
            self.problem(image, f"image without mask (expected {mask_hint})")
        elif image is not None and mask is not None:
            self.add(Case(case_id, split, image, mask, subtype))


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


# ---------------------------------------------------------------------------------------------------- published


def scan_published(root: Path) -> Source:
    """Scan ``root/{train,validation}/subtype<k>/quiz_<k>_<id>[_0000].nii.gz`` and ``root/test/quiz_<id>_0000``."""
    root = Path(root).resolve()
    source = Source(base=root)
    if not root.is_dir():
        source.problems.append(f"{root}: not a folder")
        return source
    found = {split: _scan_published_split(source, root / split) for split in LABELLED_SPLITS}
    test = root / "test"
    if test.exists():
        _scan_published_test(source, test)
    for entry in _visible(root):
        if entry.name not in (*LABELLED_SPLITS, "test"):
            source.warnings.append(f"{entry.name}: ignored (not part of the published layout)")
    subtypes = set().union(*found.values())
    for split, present in found.items():
        for missing in sorted(subtypes - present) if present else []:
            source.problem(root / split / f"subtype{missing}", "missing folder (the other split has it)")
    if subtypes and subtypes != set(range(max(subtypes) + 1)):
        source.problems.append(f"subtype folders must be numbered 0..K-1 without gaps, found {sorted(subtypes)}")
    source.class_names = [f"subtype{k}" for k in range(max(subtypes) + 1)] if subtypes else []
    _check_repeated_numbers(source)
    return source


def _check_repeated_numbers(source: Source) -> None:
    """One case number under two subtypes (quiz_0_001 and quiz_1_001): the published data never repeats a number,
    so it is worth a warning; the same image under both is an error (one scan, two contradicting subtypes)."""
    by_number: dict[str, list[Case]] = {}
    for case in source.cases.values():
        match = PUBLISHED_CASE.fullmatch(case.image.name)
        if match is not None and case.mask is not None:
            by_number.setdefault(match["number"], []).append(case)
    for number, cases in sorted(by_number.items()):
        if len(cases) < 2:
            continue
        files = " and ".join(source.show(c.image) for c in cases)
        first = cases[0].image
        same = [c for c in cases[1:] if c.image.stat().st_size == first.stat().st_size
                and filecmp.cmp(first, c.image, shallow=False)]
        if same:
            source.problems.append(f"case number {number} appears under several subtypes with the same image: "
                                   f"{files} (one scan cannot have two subtypes)")
        else:
            source.warnings.append(f"case number {number} appears under several subtypes: {files} (the published "
                                   "data never repeats a number; check these are different cases)")


def _scan_published_split(source: Source, folder: Path) -> set[int]:
    if not folder.is_dir():
        source.problem(folder, "missing split folder (expected subtype0/, subtype1/, ... inside)")
        return set()
    subtypes = set()
    for entry in _visible(folder):
        match = SUBTYPE_FOLDER.fullmatch(entry.name)
        if match is None or not entry.is_dir():
            source.problem(entry, "unexpected entry (expected only folders subtype0, subtype1, ...)")
            continue
        subtypes.add(int(match["subtype"]))
        _scan_subtype_folder(source, entry, folder.name, int(match["subtype"]))
    if not subtypes:
        source.problem(folder, "no subtype<k> folders in this split folder")
    return subtypes


def _scan_subtype_folder(source: Source, folder: Path, split: str, subtype: int) -> None:
    entries = _visible(folder)
    if not entries:
        source.problem(folder, "empty folder")
    pairs: dict[str, dict[str, Path]] = {}
    for entry in entries:
        match = PUBLISHED_CASE.fullmatch(entry.name) if entry.is_file() else None
        if match is None:
            source.problem(entry, "unexpected file (expected quiz_<subtype>_<id>.nii.gz masks and "
                                  "quiz_<subtype>_<id>_0000.nii.gz images)")
            continue
        if int(match["subtype"]) != subtype:
            source.problem(entry, f"subtype {match['subtype']} in the file name disagrees with the folder "
                                  f"{folder.name}")
        case_id = f"quiz_{match['subtype']}_{match['number']}"
        pairs.setdefault(case_id, {})["image" if match["channel"] else "mask"] = entry
    for case_id, files in pairs.items():
        source.add_labelled(case_id, split, subtype, files.get("image"), files.get("mask"),
                            f"{case_id}{CHANNEL_SUFFIX}{FILE_ENDING} beside it", f"{case_id}{FILE_ENDING} beside it")


def _scan_published_test(source: Source, folder: Path) -> None:
    entries = _visible(folder)
    if not entries:
        source.problem(folder, "empty test folder (leave it out when there are no test images)")
    for entry in entries:
        match = PUBLISHED_TEST.fullmatch(entry.name) if entry.is_file() else None
        if match is None:
            source.problem(entry, "unexpected file (expected test images quiz_<id>_0000.nii.gz)")
        else:
            source.add(Case(f"quiz_{match['number']}", "test", entry))


# ------------------------------------------------------------------------------------------------------ generic


def scan_generic(images: Path, masks: Path, classes: Path, test_images: Path | None = None) -> Source:
    """Scan an image folder (``<case>_0000.nii.gz`` or ``<case>.nii.gz``), a mask folder (``<case>.nii.gz``),
    a CSV ``case,class[,split]`` and optionally a folder of test images.

    Classes are sorted (integers numerically, so 0..K-1 keep their values; other names alphabetically) and
    indexed; without a split column every case is a training case.
    """
    folders = [Path(p).resolve() for p in (images, masks, classes, *([test_images] if test_images else []))]
    source = Source(base=Path(os.path.commonpath(folders)))
    images, masks, classes = folders[:3]
    image_files = _nifti_by_case(source, images, strip_channel=True)
    mask_files = _nifti_by_case(source, masks, strip_channel=False)
    rows = _read_classes(source, classes)
    source.class_names = sorted({label for label, _ in rows.values()}, key=_class_order)
    index = {name: i for i, name in enumerate(source.class_names)}
    for case_id in sorted(set(image_files) | set(mask_files) | set(rows)):
        image, mask = image_files.get(case_id), mask_files.get(case_id)
        if case_id not in rows:
            source.problem(image or mask, f"case {case_id} has no row in {source.show(classes)}")
        elif image is None and mask is None:
            source.problem(classes, f"case {case_id} has neither image nor mask")
        else:
            label, split = rows[case_id]
            source.add_labelled(case_id, split or "train", index[label], image, mask,
                                f"{case_id}{CHANNEL_SUFFIX}{FILE_ENDING} in {source.show(images)}",
                                f"{case_id}{FILE_ENDING} in {source.show(masks)}")
    if test_images:
        for case_id, path in _nifti_by_case(source, folders[3], strip_channel=True).items():
            source.add(Case(case_id, "test", path))
    return source


def _class_order(name: str) -> tuple[int, int, str]:
    return (0, int(name), "") if re.fullmatch(r"-?\d+", name) else (1, 0, name)


def _strip_ending(name: str) -> str | None:
    ending = next((e for e in NIFTI_ENDINGS if name.endswith(e)), None)
    return name[: -len(ending)] if ending else None


def _nifti_by_case(source: Source, folder: Path, strip_channel: bool) -> dict[str, Path]:
    if not folder.is_dir():
        source.problem(folder, "missing folder")
        return {}
    entries = _visible(folder)
    if not entries:
        source.problem(folder, "empty folder")
    found: dict[str, Path] = {}
    for entry in entries:
        case_id = _strip_ending(entry.name) if entry.is_file() else None
        if case_id is None:
            source.problem(entry, "unexpected file (expected NIfTI files .nii.gz or .nii)")
            continue
        if strip_channel and case_id.endswith(CHANNEL_SUFFIX):
            case_id = case_id[: -len(CHANNEL_SUFFIX)]
        if case_id in found:
            source.problem(entry, f"duplicate case id {case_id} (also {source.show(found[case_id])})")
        else:
            found[case_id] = entry
    return found


def _read_classes(source: Source, path: Path) -> dict[str, tuple[str, str | None]]:
    """CSV rows by case id: (class name, split or None). Case ids may carry a NIfTI ending (quiz_037.nii.gz)."""
    try:
        lines = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    except (OSError, UnicodeDecodeError) as e:
        source.problem(path, f"cannot read the class table ({e})")
        return {}
    header = [cell.strip() for cell in lines[0]] if lines else []
    if header not in (["case", "class"], ["case", "class", "split"]):
        source.problem(path, f"header must be case,class or case,class,split, found {','.join(header) or 'nothing'}")
        return {}
    source.split_given = "split" in header
    rows: dict[str, tuple[str, str | None]] = {}
    for line_no, cells in enumerate(lines[1:], start=2):
        cells = [cell.strip() for cell in cells]
        if not any(cells):
            continue
        if len(cells) != len(header):
            source.problem(path, f"line {line_no}: {len(cells)} columns, expected {len(header)}")
            continue
        case_id, label, split = cells[0], cells[1], (cells[2] if len(cells) > 2 else None)
        case_id = _strip_ending(case_id) or case_id
        if not case_id or not label:
            source.problem(path, f"line {line_no}: empty case or class")
        elif split is not None and split not in LABELLED_SPLITS:
            source.problem(path, f"line {line_no}: split {split!r} is neither train nor validation")
        elif case_id in rows:
            source.problem(path, f"line {line_no}: duplicate case id {case_id}")
        else:
            rows[case_id] = (label, split)
    return rows


# ------------------------------------------------------------------------------------------------------- splits


def make_splits(subtypes: dict[str, int], validation: Sequence[str] | None, n_folds: int = DEFAULT_FOLDS,
                seed: int = DEFAULT_SEED) -> tuple[list[dict[str, list[str]]], list[str]]:
    """nnU-Net's splits_final.json content and notes about it.

    Fold 0 is the given train/validation split (or, when none is given, the first cross-validation fold); folds
    1..n are a seeded stratified K-fold over the training cases only, so fold 0's validation cases stay unseen.
    """
    from sklearn.model_selection import StratifiedKFold

    held_out = set(validation or ())
    train = sorted(c for c in subtypes if c not in held_out)
    classes = [subtypes[c] for c in train]
    # StratifiedKFold refuses more folds than the largest class has members
    k = min(n_folds, max(Counter(classes).values(), default=0))
    notes: list[str] = []
    cross_validation = []
    if k < 2:
        notes.append(f"{len(train)} training case(s) allow no cross-validation: splits_final.json holds fold 0 only")
    else:
        if k < n_folds:
            notes.append(f"too few training cases for {n_folds} folds: made {k}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for fit, val in StratifiedKFold(k, shuffle=True, random_state=seed).split(train, classes):
                cross_validation.append({"train": [train[i] for i in fit], "val": [train[i] for i in val]})
        notes += [f"cross-validation: {w.message}" for w in caught]
    if validation is not None:
        fold0 = {"train": train, "val": sorted(held_out)}
    else:
        fold0 = cross_validation[0] if cross_validation else {"train": train, "val": []}
    if not fold0["val"]:
        notes.append("fold 0 has no validation cases")
    return [fold0, *cross_validation], notes


# ------------------------------------------------------------------------------------------------------- import


@dataclass
class ImportReport:
    """What an import wrote; :meth:`table` is the summary the command prints."""

    target: Path
    class_names: list[str]
    counts: dict[str, Counter] = field(default_factory=dict)
    spacings: list[tuple[float, ...]] = field(default_factory=list)
    sizes: list[tuple[int, ...]] = field(default_factory=list)
    masks: int = 0
    rounded: int = 0
    n_folds: int = 0
    split_given: bool = True
    warnings: list[str] = field(default_factory=list)

    def table(self) -> str:
        names = [*self.class_names, "total"]
        width = max(8, *(len(n) for n in names))
        lines = [f"imported into {self.target}", f"{'split':<12}" + "".join(f"{n:>{width + 2}}" for n in names)]
        for split in (*LABELLED_SPLITS, "test"):
            if split in self.counts:
                counts = self.counts[split]
                cells = ["-" if split == "test" else counts.get(i, 0) for i in range(len(self.class_names))]
                lines.append(f"{split:<12}" + "".join(f"{c:>{width + 2}}" for c in [*cells, counts.total()]))
        if self.spacings:
            lines.append("spacing mm (z, y, x): " + _range(np.array(self.spacings), "{:.3g}"))
            lines.append("size voxels (z, y, x): " + _range(np.array(self.sizes), "{:.0f}"))
        lines.append(f"masks rounded to integers: {self.rounded} of {self.masks}")
        fold0 = "the given train/validation split" if self.split_given else "cross-validation fold 1"
        folds = f", folds 1-{self.n_folds} = stratified cross-validation of the training cases" if self.n_folds else ""
        lines.append(f"splits_final.json: fold 0 = {fold0}{folds}")
        return "\n".join(lines)


def _range(values: np.ndarray, fmt: str) -> str:
    def row(v: np.ndarray) -> str:
        return ", ".join(fmt.format(x) for x in v)

    return (f"min {row(values.min(0))} | median {row(np.median(values, 0))} | max {row(values.max(0))}"
            f" (over {len(values)} images)")


class _Writer:
    """Checks one case at a time and writes it into the temporary dataset folder while no problem is known."""

    def __init__(self, source: Source, folder: Path, labels: Sequence[str], report: ImportReport) -> None:
        self.source, self.folder, self.labels, self.report = source, folder, list(labels), report
        self.problems = list(source.problems)

    def case(self, case: Case) -> int | None:
        """Check and write one case; returns its subtype, or None for a test image."""
        image = self._read(case.image, "image", keep_file_bytes=True)
        if image is not None:
            self.report.spacings.append(image.geometry.spacing[::-1])
            self.report.sizes.append(image.geometry.size[::-1])
        if case.mask is None:
            if not self.problems:
                self._copy_image(case, image, "imagesTs")
            return None
        mask = self._read(case.mask, "mask")
        self.report.masks += 1
        if mask is None:
            return case.subtype
        cleaned = clean_mask(mask.array, len(self.labels))
        self._note(case.mask, cleaned.problems + (geometry_problems(image.geometry, mask.geometry) if image else []))
        if cleaned.array is None:
            return case.subtype
        self.report.rounded += cleaned.rounded
        absent = [f"{v} ({self.labels[v]})" for v in range(1, len(self.labels)) if v not in cleaned.labels_present]
        if absent:
            self.report.warnings.append(f"{self.source.show(case.mask)}: no voxel of label {', '.join(absent)}")
        if not self.problems:
            self._copy_image(case, image, "imagesTr")
            # the image's exact header, so nnU-Net's strict grid check passes
            labels = image.geometry.apply_to(sitk.GetImageFromArray(cleaned.array))
            sitk.WriteImage(labels, str(self.folder / "labelsTr" / f"{case.case_id}{FILE_ENDING}"),
                            useCompression=True)
        return case.subtype

    def _read(self, path: Path, what: str, keep_file_bytes: bool = False) -> Volume | None:
        """The verified volume, or None with the problem noted (every file is read, so all problems are listed)."""
        try:
            return read_volume(path, what, keep_file_bytes)
        except NiftiError as e:
            self._note(path, [e.problem])
            return None

    def _note(self, path: Path, problems: list[str]) -> None:
        self.problems += [f"{self.source.show(path)}: {p}" for p in problems]

    def _copy_image(self, case: Case, image: Volume, subfolder: str) -> None:
        target = self.folder / subfolder / f"{case.case_id}{CHANNEL_SUFFIX}{FILE_ENDING}"
        if image.compressed and image.file_bytes is not None:
            target.write_bytes(image.file_bytes)  # byte for byte, from the bytes already verified (no second read)
        else:  # uncompressed NIfTI (.nii, or under a .nii.gz name): nnU-Net's raw folder gets .nii.gz
            sitk.WriteImage(image.image(), str(target), useCompression=True)


def _target_folder(raw: Path, dataset_id: int, name: str, labels: Sequence[str], force: bool) -> Path:
    """Where the dataset goes; refuses bad names and ids, and an existing dataset unless forced."""
    problems = []
    if not DATASET_NAME.fullmatch(name):
        problems.append(f"dataset name {name!r}: use letters, digits, '_' and '-' only")
    if not 0 < dataset_id <= 999:
        problems.append(f"dataset id {dataset_id}: nnU-Net ids are 1..999")
    if len(labels) < 2 or len(set(labels)) != len(labels) or len(labels) > 256 or not all(labels):
        problems.append(f"labels {','.join(labels)}: need 2..256 distinct non-empty names, background first")
    if problems:
        raise DatasetImportError(problems)
    target = raw / dataset_folder_name(dataset_id, name)
    same_id = sorted(p for p in raw.glob(f"Dataset{dataset_id:03d}_*") if p != target) if raw.is_dir() else []
    if same_id:
        problems.append(f"{same_id[0]}: dataset id {dataset_id} is taken by another dataset (nnU-Net finds "
                        "datasets by id); remove it or choose another --dataset-id")
    if target.exists() and not force:
        problems.append(f"{target}: dataset exists already (use --force to replace it)")
    if problems:
        raise DatasetImportError(problems)
    return target


def import_dataset(source: Source, raw: Path, dataset_id: int, name: str = DEFAULT_NAME,
                   labels: Sequence[str] = DEFAULT_LABELS, channel_name: str = DEFAULT_CHANNEL, force: bool = False,
                   n_folds: int = DEFAULT_FOLDS, seed: int = DEFAULT_SEED, progress: bool = True) -> ImportReport:
    """Check every file of ``source`` and write ``raw/Dataset<NNN>_<name>``; all or nothing.

    Raises :class:`DatasetImportError` listing every problem (layout and content) when there is any.
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    raw = Path(raw)
    target = _target_folder(raw, dataset_id, name, labels, force)
    report = ImportReport(target, source.class_names, split_given=source.split_given, warnings=list(source.warnings))
    make_dirs(raw)
    for stale in remove_stale(raw):  # what an import killed with kill -9 (or a power cut) left behind
        report.warnings.append(f"removed {stale.name}, left in {raw} by an interrupted import")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{owner_tag('importing')}-", dir=raw))
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (tmp / sub).mkdir()
        writer = _Writer(source, tmp, labels, report)
        subtypes: dict[str, int] = {}
        for case in tqdm(source.cases.values(), desc="import", unit="case", disable=not progress):
            subtype = writer.case(case)
            report.counts.setdefault(case.split, Counter())[subtype] += 1
            if subtype is not None:
                subtypes[case.case_id] = subtype
        if writer.problems:
            raise DatasetImportError(writer.problems, report.warnings)
        validation = [c.case_id for c in source.cases.values() if c.split == "validation"]
        splits, notes = make_splits(subtypes, validation if source.split_given else None, n_folds, seed)
        report.warnings += notes
        report.n_folds = len(splits) - 1
        if not any((tmp / "imagesTs").iterdir()):
            (tmp / "imagesTs").rmdir()
        generate_dataset_json(str(tmp), {0: channel_name}, {label: i for i, label in enumerate(labels)},
                              len(subtypes), FILE_ENDING, dataset_name=target.name,
                              license="as the source dataset", converted_by=f"nnunet-mtl {__version__} import",
                              subtype_names={str(i): n for i, n in enumerate(source.class_names)},
                              case_subtypes=subtypes)
        (tmp / "splits_final.json").write_text(json.dumps(splits, indent=2) + "\n")
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _move_into_place(tmp: Path, target: Path) -> None:
    """Swap the finished folder in with renames, so readers never see a half-written dataset."""
    old = target.with_name(f".{target.name}.{owner_tag('replaced')}") if target.exists() else None
    if old is not None:
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old)
