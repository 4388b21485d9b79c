"""Prediction split across machines (--num-parts / --part-id) and the submission that gathers the parts."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from nnunet_mtl.cli import main as cli_main
from nnunet_mtl.inference.parts import IncompleteParts, Part, gather_parts


def test_parts_split_like_nnunet_disjoint_and_complete(tmp_path):
    """Same split as nnU-Net's predict_from_files (its sorted case list sliced [part_id::num_parts])."""
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    ids = [f"quiz_{i:03d}" for i in (7, 3, 12, 1, 40, 5, 9)]
    for case in ids:
        (tmp_path / f"{case}_0000.nii.gz").touch()
    cases = {case: tmp_path / f"{case}_0000.nii.gz" for case in ids}
    nnunet_lists = create_lists_from_splitted_dataset_folder(str(tmp_path), ".nii.gz")
    for n in (1, 2, 3, 7, 9):
        chosen = [list(Part(n, k).select(cases)) for k in range(n)]
        for k in range(n):
            assert [cases[c].name for c in chosen[k]] == [Path(x[0]).name for x in nnunet_lists[k::n]]
        flat = [c for part in chosen for c in part]
        assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))


@pytest.mark.parametrize("n, k", [(0, 0), (3, 3), (3, -1)])
def test_impossible_parts_are_refused(n, k):
    with pytest.raises(ValueError, match="num-parts|part-id"):
        Part(n, k)


def predict_part(model: Path, images: Path, out: Path, k: int, n: int = 2) -> int:
    return cli_main(["predict", "-i", str(images), "-o", str(out), "-m", str(model), "--fast", "--device", "cpu",
                     "--num-parts", str(n), "--part-id", str(k)])


def test_parts_predict_resume_and_gather_into_the_single_run_result(tiny_model, tiny_test_crops, tmp_path,
                                                                     monkeypatch, capsys):
    images = tiny_test_crops
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in images.glob("*_0000.nii.gz"))
    single, parted = tmp_path / "single", tmp_path / "parted"
    assert cli_main(["predict", "-i", str(images), "-o", str(single), "-m", str(tiny_model), "--fast",
                     "--device", "cpu"]) == 0

    # part 0 (cases 0 and 2) is interrupted after its first case
    import nnunet_mtl.inference.predict as predict_module

    original = predict_module.infer_case
    calls = []

    def killed_on_second(*args, **kwargs):
        calls.append(args[1].case)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(predict_module, "infer_case", killed_on_second)
    assert predict_part(tiny_model, images, parted, 0) == 130
    monkeypatch.setattr(predict_module, "infer_case", original)
    manifest = json.loads((parted / "parts/part_0_of_2/manifest.json").read_text())
    assert manifest["part_cases"] == cases[0::2] and manifest["finished"] == [cases[0]]
    assert manifest["all_cases"] == cases and not manifest["complete"]

    zip_path = tmp_path / "results.zip"
    capsys.readouterr()
    assert cli_main(["submission", str(parted), "--zip", str(zip_path)]) == 2
    error = capsys.readouterr().err
    assert "part 0 of 2 is unfinished" in error and cases[2] in error and "part 1 of 2 is missing" in error
    assert not zip_path.exists() and not (parted / "subtype_results.csv").exists()

    assert predict_part(tiny_model, images, parted, 1) == 0
    assert predict_part(tiny_model, images, parted, 0) == 0  # resumes: only the case left is predicted
    assert calls == [cases[0], cases[2]]
    assert "predicted 1 (part 0 of 2), kept 1" in capsys.readouterr().out
    assert cli_main(["submission", str(parted), "--zip", str(zip_path), "--images", str(images)]) == 0
    with zipfile.ZipFile(zip_path) as zf:
        assert sorted(zf.namelist()) == sorted([f"{c}.nii.gz" for c in cases] + ["subtype_results.csv"])
    for table in ("subtype_results.csv", "subtype_probabilities.csv"):
        assert (parted / table).read_text() == (single / table).read_text()
    for case in cases:
        assert (parted / f"{case}.nii.gz").read_bytes() == (single / f"{case}.nii.gz").read_bytes()


def write_manifest(folder: Path, k: int, n: int, all_cases: list[str], finished: list[str], settings=None):
    from nnunet_mtl.inference.parts import write_manifest as write

    write(folder, Part(n, k), all_cases, finished, {}, settings or {"fast": True})


def test_gathering_refuses_parts_that_do_not_belong_together(tmp_path):
    cases = ["a", "b", "c", "d"]
    write_manifest(tmp_path, 0, 2, cases, ["a", "c"])
    write_manifest(tmp_path, 1, 2, cases + ["e"], ["b", "d"], settings={"fast": False})
    with pytest.raises(IncompleteParts) as error:
        gather_parts(tmp_path, expected_cases=cases)
    message = str(error.value)
    assert "part 1 of 2 saw another input folder" in message and "other settings" in message
    assert not (tmp_path / "subtype_results.csv").exists()
    write_manifest(tmp_path, 1, 2, cases, ["b"])
    with pytest.raises(IncompleteParts) as error:
        gather_parts(tmp_path, expected_cases=cases[:3])
    message = str(error.value)
    assert "the parts cover 4 cases, the images folder holds 3; not in the images folder: d" in message
    assert "part 1 of 2 is unfinished (1 of 2 cases; not done: d)" in message
    assert gather_parts(tmp_path / "no-parts-here") is None
