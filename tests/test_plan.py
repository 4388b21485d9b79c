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
