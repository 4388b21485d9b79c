"""`nnunet-mtl plan` at the command line (the session's tiny dataset is planned through it): nnU-Net's plans and
preprocessed data, and multi-task plans naming our network around nnU-Net's U-Net."""

from __future__ import annotations

import json

from tiny import TINY_TEST_CASES, TINY_TRAIN_PER_SUBTYPE, TINY_VAL_PER_SUBTYPE

from nnunet_mtl.planning.plans import MTL_NETWORK_CLASS


def test_plan_command_writes_nnunet_and_multitask_plans(tiny_dataset):
    code, printed = tiny_dataset["plan"]
    preprocessed = tiny_dataset["preprocessed"]
    assert code == 0
    written = dict(line.removeprefix("multi-task plans ").split(": ", 1) for line in printed.splitlines()
                   if line.startswith("multi-task plans "))
    assert written == {"nnUNetPlans_MTL": str(preprocessed / "nnUNetPlans_MTL.json"),
                       "nnUNetPlans_MTLdemo": str(preprocessed / "nnUNetPlans_MTLdemo.json")}
    stock = json.loads((preprocessed / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    assert stock["architecture"]["network_class_name"].endswith("PlainConvUNet")  # nnU-Net's own, untouched
    for name in written:
        config = json.loads((preprocessed / f"{name}.json").read_text())["configurations"]["3d_fullres"]
        assert config["architecture"]["network_class_name"] == MTL_NETWORK_CLASS
        assert config["architecture"]["arch_kwargs"]["backbone"] == stock["architecture"]["network_class_name"]
        assert config["data_identifier"] == stock["data_identifier"]  # the same preprocessed data
    # nnU-Net preprocessed every labelled case once, and copied the published split as fold 0
    labelled = sum(TINY_TRAIN_PER_SUBTYPE) + sum(TINY_VAL_PER_SUBTYPE)
    cases = {p.stem for p in (preprocessed / stock["data_identifier"]).glob("*.pkl")}  # one properties file each
    assert cases == {p.name.removesuffix(".nii.gz") for p in (tiny_dataset["raw"] / "labelsTr").iterdir()}
    assert len(cases) == labelled
    splits = json.loads((preprocessed / "splits_final.json").read_text())
    assert splits == json.loads((tiny_dataset["raw"] / "splits_final.json").read_text())
    assert len(splits[0]["val"]) == sum(TINY_VAL_PER_SUBTYPE)
    assert len(list((tiny_dataset["raw"] / "imagesTs").iterdir())) == TINY_TEST_CASES


def test_nnunets_integrity_check_runs_only_when_asked(tiny_dataset, tmp_path, monkeypatch, capsys):
    """`import` checked and wrote every file, so `plan` skips nnU-Net's second reading of them unless
    --check-dataset asks for it; a raw dataset that `import` did not write is refused before any work."""
    import shutil

    import nnunetv2.experiment_planning.plan_and_preprocess_api as nnunet_api

    from nnunet_mtl.cli import main

    asked = []

    def fingerprint_stops_here(dataset_ids, num_processes, check_dataset_integrity, clean):
        asked.append(check_dataset_integrity)
        raise RuntimeError("stopped after the fingerprint call")

    monkeypatch.setattr(nnunet_api, "extract_fingerprints", fingerprint_stops_here)
    work = tmp_path / "work"
    raw = work / "nnUNet_raw" / tiny_dataset["raw"].name
    shutil.copytree(tiny_dataset["raw"], raw)
    dataset_id = raw.name.split("_")[0].removeprefix("Dataset")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(work / var))
    for extra in ([], ["--check-dataset"]):
        assert main(["plan", dataset_id, "--workdir", str(work), *extra]) == 2
    assert asked == [False, True]
    assert "stopped after the fingerprint call" in capsys.readouterr().err

    dataset_json = json.loads((raw / "dataset.json").read_text())
    del dataset_json["subtype_names"]
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    assert main(["plan", dataset_id, "--workdir", str(work)]) == 2
    assert "import the dataset with `nnunet-mtl import` first" in capsys.readouterr().err
    assert asked == [False, True]  # refused before nnU-Net was called

    (raw / "dataset.json").write_text(json.dumps({**dataset_json, "subtype_names": {"0": "a", "1": "b"}}))
    assert main(["plan", dataset_id, "--workdir", str(work), "--demo-patch", "24", "64", "64"]) == 2
    assert "give --preset demo with it" in capsys.readouterr().err
    assert asked == [False, True]  # a demo patch without the demo preset: refused before nnU-Net too
