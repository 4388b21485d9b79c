"""Plan and preprocess with nnU-Net itself, then derive the multi-task plans.

nnU-Net's static ``build_network_architecture`` sees only the plans, so everything the network needs beyond the
segmentation plan (backbone class, number of subtypes, head kind) is written into a derived plans file next to
nnU-Net's own: ``<base>_MTL.json`` (full protocol) and, with the demo preset, ``<base>_MTLdemo.json`` (a small network
and patch that trains on two CPU cores in minutes). The derived plans keep the base plans' ``data_identifier``, so
they reuse nnU-Net's preprocessed data; nnU-Net's code is never changed, only plans are written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

from nnunet_mtl import paths

MTL_NETWORK_CLASS = "nnunet_mtl.model.network.MultiTaskUNet"
CONFIGURATION = "3d_fullres"
DEFAULT_HEAD = "lesion_attention"


@dataclass(frozen=True)
class PlannerChoice:
    planner_class: str
    plans_name: str


PLANNERS = {
    "default": PlannerChoice("ExperimentPlanner", "nnUNetPlans"),
    "resenc-m": PlannerChoice("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"),
}
# What `train --plans X` means: derived plans identifiers.
PLANS_CHOICES = {
    "default": "nnUNetPlans_MTL",
    "resenc-m": "nnUNetResEncUNetMPlans_MTL",
    "demo": "nnUNetPlans_MTLdemo",
}

# Demo preset: a 4-stage network with 16 base features and a patch of at most 24 x 48 x 48 (z, y, x).
DEMO_STAGES = 4
DEMO_BASE_FEATURES = 16
DEMO_MAX_FEATURES = 128
DEMO_MAX_PATCH = (24, 48, 48)
DEMO_BATCH_SIZE = 2


def resolve_plans_identifier(choice: str) -> str:
    """`default`, `resenc-m`, `demo`, or a plans identifier given verbatim."""
    return PLANS_CHOICES.get(choice, choice)


def dataset_name(dataset: str | int) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    return maybe_convert_to_dataset_name(str(dataset) if not isinstance(dataset, int) else dataset)


def derive_multitask_plans(base_plans: dict, subtype_names: list[str], head: str = DEFAULT_HEAD,
                           preset: str | None = None, demo_patch: Sequence[int] | None = None) -> dict:
    """Return a copy of nnU-Net's plans whose 3d_fullres network is our MultiTaskUNet around the planned U-Net.

    ``demo_patch`` (z, y, x) replaces the demo preset's patch cap (``DEMO_MAX_PATCH``): a larger field of view for
    the same small network, never larger than nnU-Net's own patch."""
    if CONFIGURATION not in base_plans["configurations"]:
        raise ValueError(f"nnU-Net planned no {CONFIGURATION} configuration for this dataset")
    plans = deepcopy(base_plans)
    base_name = base_plans["plans_name"]
    plans["plans_name"] = f"{base_name}_MTL" + (preset or "")
    configuration = plans["configurations"][CONFIGURATION]
    # Other configurations (2d, lowres, cascade) are not multi-task; keep them out so nobody trains them by mistake.
    plans["configurations"] = {CONFIGURATION: configuration}
    architecture = configuration["architecture"]
    architecture["arch_kwargs"] = {"backbone": architecture["network_class_name"],
                                   "num_subtypes": len(subtype_names), "head": head,
                                   **architecture["arch_kwargs"]}
    architecture["network_class_name"] = MTL_NETWORK_CLASS
    plans["multitask"] = {"base_plans": base_name, "subtype_names": list(subtype_names), "head": head,
                          "preset": preset}
    if demo_patch is not None and preset != "demo":
        raise ValueError("a demo patch is a setting of the demo preset: give preset 'demo' with it")
    if preset == "demo":
        if demo_patch is not None:
            if len(demo_patch) != 3 or min(demo_patch) < 1:
                raise ValueError(f"demo patch must be three positive sizes (z y x), got {list(demo_patch)}")
            plans["multitask"]["demo_patch"] = [int(v) for v in demo_patch]
        _shrink_for_demo(configuration, tuple(demo_patch) if demo_patch is not None else DEMO_MAX_PATCH)
    elif preset is not None:
        raise ValueError(f"unknown preset {preset!r} (known: demo)")
    return plans


def _shrink_for_demo(configuration: dict, max_patch: Sequence[int] = DEMO_MAX_PATCH) -> None:
    """Fewer stages, fewer features, a small patch: same preprocessing, a network a 2-core CPU trains in minutes."""
    kwargs = configuration["architecture"]["arch_kwargs"]
    n_stages = min(DEMO_STAGES, kwargs["n_stages"])
    kwargs["n_stages"] = n_stages
    kwargs["features_per_stage"] = [min(DEMO_BASE_FEATURES * 2 ** i, DEMO_MAX_FEATURES) for i in range(n_stages)]
    for key in ("kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage"):
        if key in kwargs:
            kwargs[key] = kwargs[key][:n_stages]
    kwargs["n_conv_per_stage_decoder"] = kwargs["n_conv_per_stage_decoder"][:n_stages - 1]
    divisor = [1] * len(configuration["patch_size"])
    for stride in kwargs["strides"]:
        divisor = [d * s for d, s in zip(divisor, stride)]
    patch = []
    for size, cap, div in zip(configuration["patch_size"], tuple(max_patch)[-len(divisor):], divisor):
        patch.append(max(div, (min(size, cap) // div) * div))
    configuration["patch_size"] = patch
    configuration["batch_size"] = DEMO_BATCH_SIZE


def subtype_names_from_dataset_json(dataset_json: dict) -> list[str]:
    names = dataset_json.get("subtype_names")
    if not names:
        raise ValueError("dataset.json has no 'subtype_names': import the dataset with `nnunet-mtl import` first")
    return [names[str(i)] for i in range(len(names))]


def _write_json_atomic(path: Path, content: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, path)


def plan_and_preprocess(dataset: str | int, planner: str = "default", preset: str | None = None,
                        head: str = DEFAULT_HEAD, num_processes: int | None = None,
                        force: bool = False, check_dataset: bool = False,
                        demo_patch: Sequence[int] | None = None) -> dict[str, Path]:
    """Fingerprint, plan and preprocess with nnU-Net, then write the derived multi-task plans.

    nnU-Net's planner itself copies the importer's splits_final.json (fold 0 = the published split) from raw.
    The dataset must come from ``nnunet-mtl import``, which checked every file and wrote the masks itself on their
    images' grids; nnU-Net's own integrity check (every file read again, in a process pool) runs only with
    ``check_dataset`` (files edited by hand since the import).

    Returns the paths of the plans files written, by plans identifier.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess_dataset,
    )
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    if planner not in PLANNERS:
        raise ValueError(f"unknown planner {planner!r}; choose one of {sorted(PLANNERS)}")
    choice = PLANNERS[planner]
    work = paths.current()
    name = dataset_name(dataset)
    dataset_id = convert_dataset_name_to_id(name)
    raw_folder = work.raw / name
    preprocessed_folder = work.preprocessed / name
    n_proc = num_processes or int(os.environ.get("nnUNet_def_n_proc", "2"))
    dataset_json = json.loads((raw_folder / "dataset.json").read_text())
    subtypes = subtype_names_from_dataset_json(dataset_json)  # refused here, before any work, if not imported
    if demo_patch is not None and preset != "demo":
        raise ValueError("--demo-patch sets the demo preset's patch: give --preset demo with it")

    fingerprint = preprocessed_folder / "dataset_fingerprint.json"
    if force or not fingerprint.is_file():
        extract_fingerprints([dataset_id], num_processes=n_proc, check_dataset_integrity=check_dataset,
                             clean=True)
    plan_experiments([dataset_id], choice.planner_class)
    base_plans_file = preprocessed_folder / f"{choice.plans_name}.json"
    base_plans = json.loads(base_plans_file.read_text())
    data_folder = preprocessed_folder / base_plans["configurations"][CONFIGURATION]["data_identifier"]
    if force or not data_folder.is_dir() or not any(data_folder.iterdir()):
        preprocess_dataset(dataset_id, choice.plans_name, [CONFIGURATION], [n_proc])

    written = {}
    for this_preset in [None] + ([preset] if preset else []):
        plans = derive_multitask_plans(base_plans, subtypes, head=head, preset=this_preset,
                                       demo_patch=demo_patch if this_preset == "demo" else None)
        target = preprocessed_folder / f"{plans['plans_name']}.json"
        _write_json_atomic(target, plans)
        written[plans["plans_name"]] = target
    return written
