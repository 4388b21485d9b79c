"""The corruption matrix: every command that reads NIfTI files x every kind of damage.

Each cell runs the command in process (``nnunet_mtl.cli.main``) on tiny volumes with one file damaged and checks
the promised outcome: refused (exit 2, the file named, no traceback, nothing written: no output, no temporary, no
empty folder), a failed case (predict: exit 1, the file named, nothing of that case written), or results identical to
the intact file's. ``EXPECTED`` is the matrix; ``docs/measurements-corruption.md`` shows it as a table with counts.

Images that give only a reference grid (``evaluate --images``, ``check-submission --images``) are read header
only: damage after the header cannot change those commands' results, and the matrix asserts that they are
identical then.
"""

from __future__ import annotations

import gzip
import json
import shutil
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from volumes import crop_phantom_test_images

from nnunet_mtl.cli import main

KINDS = ("cut 10 %", "cut 50 %", "cut 90 %", "flipped byte", "0 bytes", "another format", "uncompressed",
         "wrong dtype", "NaN", "inf", "2D", "4D")
ACCEPTED = ("uncompressed", "wrong dtype")  # a NIfTI that is whole and usable: results must not change
DAMAGED_AFTER_THE_HEADER = ("cut 10 %", "cut 50 %", "cut 90 %", "flipped byte")
HEADER_INTACT = (*DAMAGED_AFTER_THE_HEADER, "uncompressed", "wrong dtype", "NaN", "inf")  # the grid is unchanged


def _outcomes(default: str, identical: tuple[str, ...] = ACCEPTED) -> dict[str, str]:
    return {kind: "identical" if kind in identical else default for kind in KINDS}


# (command, damaged file) -> damage kind -> outcome
EXPECTED = {
    ("import", "training image"): _outcomes("refused"),
    ("import", "training mask"): _outcomes("refused"),
    ("import", "test image"): _outcomes("refused"),
    ("predict", "image"): _outcomes("case failed"),
    ("evaluate", "prediction mask"): _outcomes("refused"),
    ("evaluate", "truth mask"): _outcomes("refused"),
    ("evaluate", "image (header only)"): _outcomes("refused", HEADER_INTACT),
    ("report", "image"): _outcomes("refused"),
    ("submission", "mask"): _outcomes("refused", ()),  # uint8, gzip-compressed: what validators read
    ("check-submission", "mask in the zip"): _outcomes("refused", ()),
    ("check-submission", "test image (header only)"): _outcomes("refused", HEADER_INTACT),
}
CELLS = [(command, target, kind) for (command, target), row in EXPECTED.items() for kind in row]
SHAPE = (8, 16, 16)


def write(path: Path, array: np.ndarray, reference: sitk.Image | None = None) -> Path:
    image = sitk.GetImageFromArray(array, isVector=False)
    if reference is not None and array.ndim == 3:
        image.CopyInformation(reference)
    elif array.ndim == 3:
        image.SetSpacing((0.75, 0.75, 2.0))
        image.SetOrigin((10.0, -20.0, 30.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def damage(path: Path, kind: str, tmp_path: Path) -> None:
    """Damage ``path`` (an intact .nii.gz) in place."""
    intact = path.read_bytes()
    reference = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(reference)
    mask = array.dtype == np.uint8
    if kind.startswith("cut"):
        path.write_bytes(intact[: len(intact) * int(kind.split()[1]) // 100])
    elif kind == "flipped byte":
        flipped = bytearray(intact)
        flipped[len(intact) // 2] ^= 0xFF
        path.write_bytes(bytes(flipped))
    elif kind == "0 bytes":
        path.write_bytes(b"")
    elif kind == "another format":
        other = tmp_path / "other.nrrd"
        sitk.WriteImage(reference, str(other))
        path.write_bytes(other.read_bytes())
    elif kind == "uncompressed":
        path.write_bytes(gzip.decompress(intact))
    elif kind == "wrong dtype":  # masks as float32 (as the real data stores them), images as float64
        write(path, array.astype(np.float32 if mask else np.float64), reference)
    elif kind in ("NaN", "inf"):
        values = array.astype(np.float32)
        values[tuple(s // 2 for s in values.shape)] = np.nan if kind == "NaN" else np.inf
        write(path, values, reference)
    elif kind == "2D":
        write(path, array[array.shape[0] // 2])
    elif kind == "4D":
        write(path, np.stack([array, array]))
    else:
        raise ValueError(kind)


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out, captured.err


def hidden_files(*folders: Path) -> list[Path]:
    """Temporaries left behind (every temporary name of the project starts with a dot)."""
    return [p for folder in folders if folder.exists() for p in folder.rglob(".*")]


def header_survives(path: Path, intact: bytes) -> bool:
    """Independent check of what header-only reading may see: the first 352 bytes inflate as the intact ones."""
    data = path.read_bytes()
    try:
        head = zlib.decompressobj(wbits=31).decompress(data, 352) if data[:2] == b"\x1f\x8b" else data[:352]
    except zlib.error:
        return False
    return head == gzip.decompress(intact)[:352]


def assert_refused(code: int, text: str, named: str, *never_written: Path) -> None:
    assert code == 2, text
    assert named in text, f"{named!r} not named in:\n{text}"
    for path in never_written:
        assert not path.exists(), f"{path} was written"


# ------------------------------------------------------------------------------------------------------- import


def make_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-200, 300, SHAPE).astype(np.int16)


def make_mask(seed: int) -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:6, 4:12, 4:12] = 1
    mask[3:5, 6 + seed % 3:9 + seed % 3, 6:9] = 2
    return mask


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """A tiny dataset in the published layout: 2 training cases per subtype, 1 validation, 2 test images."""
    root = tmp_path_factory.mktemp("published")
    number = 0
    for split, n in (("train", 2), ("validation", 1)):
        for subtype in range(3):
            for _ in range(n):
                number += 1
                case = f"quiz_{subtype}_{number:03d}"
                write(root / split / f"subtype{subtype}" / f"{case}_0000.nii.gz", make_image(number))
                write(root / split / f"subtype{subtype}" / f"{case}.nii.gz", make_mask(number))
    for i in (1, 2):
        write(root / "test" / f"quiz_{900 + i}_0000.nii.gz", make_image(900 + i))
    return root


def dataset_digest(folder: Path) -> dict:
    """What an import produced, read with SimpleITK: voxels and geometry of every file (images as values, labels
    with their type), and the JSON files."""
    digest = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.name.endswith(".nii.gz"):
            image = sitk.ReadImage(str(path))
            array = sitk.GetArrayFromImage(image)
            values = array.astype(np.float64).tobytes() if "images" in key else (array.dtype.str, array.tobytes())
            digest[key] = (values, image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
        elif path.suffix == ".json":
            digest[key] = json.loads(path.read_text())
    return digest


@pytest.fixture(scope="module")
def intact_import(published, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("intact-import") / "work"
    assert main(["import", str(published), "--dataset-id", "7", "--workdir", str(work), "--no-progress"]) == 0
    return dataset_digest(work / "nnUNet_raw" / "Dataset007_Pancreas")


IMPORT_TARGETS = {"training image": "train/subtype1/quiz_1_003_0000.nii.gz",
                  "training mask": "validation/subtype2/quiz_2_009.nii.gz",
                  "test image": "test/quiz_901_0000.nii.gz"}


@pytest.mark.parametrize("command, target, kind", [c for c in CELLS if c[0] == "import"])
def test_import(command, target, kind, published, intact_import, tmp_path, capsys):
    source, work = tmp_path / "source", tmp_path / "work"
    shutil.copytree(published, source)
    damage(source / IMPORT_TARGETS[target], kind, tmp_path)
    code, _, err = run(capsys, "import", source, "--dataset-id", 7, "--workdir", work, "--no-progress")
    if EXPECTED[command, target][kind] == "refused":
        assert_refused(code, err, f"{IMPORT_TARGETS[target]}: ", work)  # no dataset, no temporary, no empty folder
    else:
        assert code == 0, err
        assert dataset_digest(work / "nnUNet_raw" / "Dataset007_Pancreas") == intact_import
        assert not hidden_files(work)


# ------------------------------------------------------------------------------------------------------ predict


@pytest.fixture(scope="module")
def predict_input(tiny_dataset, tiny_model, tmp_path_factory) -> dict:
    """One phantom test image cropped around its pancreas, and its intact prediction."""
    root = tmp_path_factory.mktemp("predict")
    case = crop_phantom_test_images(tiny_dataset, root / "all")[0]
    images = root / "images"
    images.mkdir()
    shutil.copyfile(root / "all" / f"{case}_0000.nii.gz", images / "case_0000.nii.gz")
    out = root / "intact"
    assert main(["predict", "-i", str(images), "-o", str(out), "-m", str(tiny_model), "--fast",
                 "--device", "cpu"]) == 0
    return {"images": images, "out": out, "model": tiny_model}


@pytest.mark.parametrize("command, target, kind", [c for c in CELLS if c[0] == "predict"])
def test_predict(command, target, kind, predict_input, tmp_path, capsys):
    images, out = tmp_path / "images", tmp_path / "out"
    shutil.copytree(predict_input["images"], images)
    damage(images / "case_0000.nii.gz", kind, tmp_path)
    code, stdout, err = run(capsys, "predict", "-i", images, "-o", out, "-m", predict_input["model"], "--fast",
                            "--device", "cpu")
    if EXPECTED[command, target][kind] == "case failed":
        assert code == 1, stdout + err
        assert "FAILED case_0000.nii.gz: " in stdout
        assert not out.exists()  # its only case failed: no mask, no table row, no temporary, no empty folder
    else:
        assert code == 0, err
        intact = predict_input["out"]
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in intact.iterdir())
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case.nii.gz"))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(intact / "case.nii.gz"))))
        for table in ("subtype_results.csv", "subtype_probabilities.csv"):
            assert (out / table).read_text() == (intact / table).read_text()


# --------------------------------------------------------------------------------------------- evaluate, report


@pytest.fixture(scope="module")
def evaluation_inputs(tmp_path_factory) -> Path:
    """truth/ (2 masks + subtypes), pred/ (2 masks + both tables), images/ (2 images)."""
    from nnunet_mtl.inference.outputs import write_subtype_tables

    root = tmp_path_factory.mktemp("evaluation")
    probabilities = {}
    for i, case in enumerate(("quiz_001", "quiz_002")):
        write(root / "images" / f"{case}_0000.nii.gz", make_image(i))
        write(root / "truth" / f"{case}.nii.gz", make_mask(i))
        write(root / "pred" / f"{case}.nii.gz", make_mask(i + 1))
        probabilities[case] = np.roll([0.6, 0.3, 0.1], i)
    (root / "truth" / "subtype_results.csv").write_text("Names,Subtype\nquiz_001.nii.gz,0\nquiz_002.nii.gz,2\n")
    write_subtype_tables(root / "pred", probabilities)
    return root


def evaluate(capsys, root: Path, out: Path) -> tuple[int, str, str]:
    return run(capsys, "evaluate", "--pred", root / "pred", "--truth", root / "truth", "--images", root / "images",
               "--out", out)


def metrics_without_sources(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("sources")
    return metrics


@pytest.fixture(scope="module")
def intact_evaluation(evaluation_inputs, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("intact-evaluation") / "metrics"
    assert main(["evaluate", "--pred", str(evaluation_inputs / "pred"), "--truth", str(evaluation_inputs / "truth"),
                 "--images", str(evaluation_inputs / "images"), "--out", str(out)]) == 0
    return metrics_without_sources(out)


EVALUATION_TARGETS = {"prediction mask": "pred/quiz_002.nii.gz", "truth mask": "truth/quiz_001.nii.gz",
                      "image (header only)": "images/quiz_002_0000.nii.gz"}


@pytest.mark.parametrize("command, target, kind", [c for c in CELLS if c[0] == "evaluate"])
def test_evaluate(command, target, kind, evaluation_inputs, intact_evaluation, tmp_path, capsys):
    root, out = tmp_path / "inputs", tmp_path / "metrics"
    shutil.copytree(evaluation_inputs, root)
    path = root / EVALUATION_TARGETS[target]
    damage(path, kind, tmp_path)
    code, _, err = evaluate(capsys, root, out)
    if EXPECTED[command, target][kind] == "refused":
        assert_refused(code, err, str(path), out)
    else:
        if target.endswith("(header only)") and kind in DAMAGED_AFTER_THE_HEADER:
            assert header_survives(path, (evaluation_inputs / EVALUATION_TARGETS[target]).read_bytes())
        assert code == 0, err
        assert metrics_without_sources(out) == intact_evaluation
        assert not hidden_files(root, out)


@pytest.fixture(scope="module")
def intact_report(evaluation_inputs, tmp_path_factory) -> tuple[Path, Path]:
    """evaluate's metrics.json for the inputs (its sources name their folder) and the report drawn from it."""
    root = tmp_path_factory.mktemp("report")
    assert main(["evaluate", "--pred", str(evaluation_inputs / "pred"), "--truth", str(evaluation_inputs / "truth"),
                 "--images", str(evaluation_inputs / "images"), "--out", str(root / "metrics")]) == 0
    assert main(["report", str(root / "metrics"), "--out", str(root / "report")]) == 0
    return root / "metrics", root / "report"


@pytest.mark.parametrize("command, target, kind", [c for c in CELLS if c[0] == "report"])
def test_report(command, target, kind, evaluation_inputs, intact_report, tmp_path, capsys):
    """The report reads image, truth and prediction of its overlay cases whole."""
    metrics, intact = intact_report
    root = tmp_path / "inputs"
    shutil.copytree(evaluation_inputs, root)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "metrics.json").write_text(  # the same metrics, pointing at the copied inputs
        (metrics / "metrics.json").read_text().replace(str(evaluation_inputs), str(root)))
    path = root / "images" / "quiz_001_0000.nii.gz"
    damage(path, kind, tmp_path)
    code, _, err = run(capsys, "report", tmp_path / "metrics", "--out", tmp_path / "report")
    if EXPECTED[command, target][kind] == "refused":
        assert_refused(code, err, str(path), tmp_path / "report")  # no figure, no page, no empty folder
    else:
        assert code == 0, err
        figures = sorted(intact.glob("overlay_*.png"))
        assert figures and sorted(p.name for p in (tmp_path / "report").glob("overlay_*.png")) == [
            p.name for p in figures]
        for figure in figures:
            assert (tmp_path / "report" / figure.name).read_bytes() == figure.read_bytes()


# ------------------------------------------------------------------------------------------------- submission


@pytest.mark.parametrize("command, target, kind", [c for c in CELLS if c[0] == "submission"])
def test_submission(command, target, kind, evaluation_inputs, tmp_path, capsys):
    preds = tmp_path / "pred"
    shutil.copytree(evaluation_inputs / "pred", preds)
    damage(preds / "quiz_001.nii.gz", kind, tmp_path)
    zip_path = tmp_path / "out" / "results.zip"
    code, _, err = run(capsys, "submission", preds, "--zip", zip_path)
    assert_refused(code, err, str(preds / "quiz_001.nii.gz"), zip_path.parent)


@pytest.fixture(scope="module")
def good_zip(evaluation_inputs, tmp_path_factory) -> Path:
    zip_path = tmp_path_factory.mktemp("zip") / "results.zip"
    assert main(["submission", str(evaluation_inputs / "pred"), "--zip", str(zip_path)]) == 0
    assert main(["check-submission", str(zip_path), "--images", str(evaluation_inputs / "images")]) == 0
    return zip_path


@pytest.mark.parametrize("command, target, kind", [c for c in CELLS if c[0] == "check-submission"])
def test_check_submission(command, target, kind, evaluation_inputs, good_zip, tmp_path, capsys):
    images, zip_path = tmp_path / "images", tmp_path / "results.zip"
    shutil.copytree(evaluation_inputs / "images", images)
    if target == "mask in the zip":
        mask = tmp_path / "quiz_002.nii.gz"
        mask.write_bytes(zipfile.ZipFile(good_zip).read(mask.name))
        damage(mask, kind, tmp_path)
        with zipfile.ZipFile(good_zip) as src, zipfile.ZipFile(zip_path, "w") as dst:
            for name in src.namelist():
                dst.writestr(name, mask.read_bytes() if name == mask.name else src.read(name))
        named = "mask quiz_002.nii.gz: "
    else:
        shutil.copyfile(good_zip, zip_path)
        damage(images / "quiz_001_0000.nii.gz", kind, tmp_path)
        named = "quiz_001_0000.nii.gz: "
    code, stdout, err = run(capsys, "check-submission", zip_path, "--images", images)
    if EXPECTED[command, target][kind] == "refused":
        assert_refused(code, stdout + err, named)
    else:
        if kind in DAMAGED_AFTER_THE_HEADER:
            assert header_survives(images / "quiz_001_0000.nii.gz",
                                   (evaluation_inputs / "images" / "quiz_001_0000.nii.gz").read_bytes())
        assert code == 0 and f"{zip_path}: valid" in stdout, stdout + err


def test_the_matrix_covers_every_kind_for_every_command():
    commands = {command for command, _ in EXPECTED}
    assert commands == {"import", "predict", "evaluate", "report", "submission", "check-submission"}
    assert all(set(row) == set(KINDS) for row in EXPECTED.values())
    assert len(CELLS) == len(EXPECTED) * len(KINDS)
