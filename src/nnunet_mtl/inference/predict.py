"""Predict a folder of CT images: one mask per case in the input geometry, a subtype with probabilities per case.

The loop is per case and in-process: on a small machine nnU-Net's spawn pools cost seconds that a crop-sized case
does not need, and a per-case loop makes resuming and isolating bad files simple. Preprocessing, the sliding
window and resampling back to the original geometry are nnU-Net's own functions.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from nnunet_mtl.inference.outputs import MASK_ENDING, read_probability_table, write_subtype_tables
from nnunet_mtl.inference.parts import Part, write_manifest
from nnunet_mtl.inference.postprocessing import keep_largest_component, read_decision
from nnunet_mtl.inference.predictor import MultiTaskPredictor
from nnunet_mtl.inference.resampling import prediction_configuration

IMAGE_SUFFIX = "_0000.nii.gz"
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth")
CPU = torch.device("cpu")


class InputError(ValueError):
    """Bad input folder, output folder or model folder: reported before any work starts."""


@dataclass(frozen=True)
class PredictionMode:
    """Default mode is nnU-Net's (Gaussian sliding window, step 0.5, mirroring); fast drops what does not pay."""

    use_mirroring: bool = True
    tile_step_size: float = 0.5
    single_pass_max_patches: float = 0.0  # crops up to this many patch volumes: one forward pass, no tiles
    channels_last: bool = False
    aggregation: str = "lesion_tile"
    classify: bool = True  # False: segmentation only (the head is not run; no subtype tables)
    largest_component: bool | None = None  # None: as the model's validation decided (postprocessing.json)
    resampler: str = "plans"  # "torch": nnU-Net's torch resampler on the device (inference/resampling.py)

    @classmethod
    def fast(cls, aggregation: str = "lesion_tile", classify: bool = True,
             largest_component: bool | None = None, resampler: str = "torch") -> PredictionMode:
        return cls(use_mirroring=False, tile_step_size=1.0, single_pass_max_patches=8.0, aggregation=aggregation,
                   classify=classify, largest_component=largest_component, resampler=resampler)


@dataclass
class PredictionReport:
    predicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds_per_case: dict[str, float] = field(default_factory=dict)


def list_cases(input_dir: Path) -> dict[str, Path]:
    """Case id -> image file, for ``<case>_0000.nii.gz`` files (single-channel CT)."""
    return {p.name[: -len(IMAGE_SUFFIX)]: p for p in sorted(input_dir.glob(f"*{IMAGE_SUFFIX}"))}


def check_folders(input_dir: Path, output_dir: Path) -> dict[str, Path]:
    if not input_dir.is_dir():
        raise InputError(f"input folder {input_dir} does not exist")
    cases = list_cases(input_dir)
    if not cases:
        raise InputError(f"input folder {input_dir} holds no images named <case>{IMAGE_SUFFIX}")
    out, inp = output_dir.resolve(), input_dir.resolve()
    if out == inp or inp in out.parents:
        raise InputError(f"output folder {output_dir} must not be inside the input folder {input_dir}")
    return cases


def check_image(path: Path) -> None:
    """The errors nnU-Net would report cryptically, or not at all (ITK reads NaN as 0), named with the file."""
    from nnunet_mtl.data.checks import check_finite, check_shape, read_nifti

    image, problems = read_nifti(path)
    if image is not None:
        problems = check_shape(image, "image") or check_finite(image, path, "image")
    if problems:
        raise InputError(f"{path.name}: {'; '.join(problems)}")


def find_checkpoints(model_dir: Path, folds: list[str] | None, checkpoint: str | None) -> list[Path]:
    if not (model_dir / "plans.json").is_file() or not (model_dir / "dataset.json").is_file():
        raise InputError(f"{model_dir} is not a trained model folder (needs plans.json, dataset.json, fold_*/)")
    fold_dirs = [model_dir / f"fold_{f}" for f in folds] if folds else sorted(model_dir.glob("fold_*"))
    found = []
    for fold_dir in fold_dirs:
        names = [checkpoint] if checkpoint else CHECKPOINTS
        hit = next((fold_dir / n for n in names if (fold_dir / n).is_file()), None)
        if hit is None:
            raise InputError(f"{fold_dir}: no checkpoint ({', '.join(names)})")
        found.append(hit)
    if not found:
        raise InputError(f"{model_dir} has no fold_* folders with checkpoints")
    return found


def load_predictor(model_dir: Path, folds: list[str] | None = None, checkpoint: str | None = None,
                   device: torch.device = CPU, mode: PredictionMode = PredictionMode(),
                   verbose: bool = False) -> MultiTaskPredictor:
    """Our network from the model folder's plans, fed to the predictor directly (no trainer lookup by name)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    checkpoints = find_checkpoints(model_dir, folds, checkpoint)
    plans_manager = PlansManager(json.loads((model_dir / "plans.json").read_text()))
    dataset_json = json.loads((model_dir / "dataset.json").read_text())
    parameters, mirror_axes, configuration = [], None, None
    for path in checkpoints:
        state = torch.load(path, map_location="cpu", weights_only=True)
        parameters.append(state["network_weights"])
        mirror_axes = state.get("inference_allowed_mirroring_axes")
        configuration = state["init_args"]["configuration"]
    configuration_manager = prediction_configuration(plans_manager.get_configuration(configuration), mode.resampler,
                                                     device)
    network = get_network_from_plans(
        configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, allow_init=False,
        deep_supervision=False)
    network.load_state_dict(parameters[0])
    network.return_classification = mode.classify
    if mode.channels_last:
        network = network.to(memory_format=torch.channels_last_3d)
    predictor = MultiTaskPredictor(tile_step_size=mode.tile_step_size, use_gaussian=True,
                                   use_mirroring=mode.use_mirroring, perform_everything_on_device=True,
                                   device=device, verbose=verbose, allow_tqdm=False,
                                   aggregation=mode.aggregation, single_pass_max_patches=mode.single_pass_max_patches,
                                   channels_last=mode.channels_last)
    predictor.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                    "nnUNetTrainerMTL", tuple(mirror_axes) if mirror_axes is not None else None)
    return predictor


def predict_case(predictor: MultiTaskPredictor, image_file: Path, output_dir: Path, case: str,
                 keep_largest: bool = False) -> np.ndarray | None:
    """Preprocess, predict, postprocess, write ``<case>.nii.gz`` atomically; return the subtype probabilities (None
    when the predictor runs segmentation only)."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    pm, cm = predictor.plans_manager, predictor.configuration_manager
    preprocessor = cm.preprocessor_class(verbose=False)
    data, _, properties = preprocessor.run_case([str(image_file)], None, pm, cm, predictor.dataset_json)
    logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data))
    segmentation = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, pm, cm, predictor.label_manager, properties, return_probabilities=False)
    if keep_largest:
        segmentation = keep_largest_component(segmentation)
    tmp = output_dir / f".{case}.tmp{MASK_ENDING}"
    pm.image_reader_writer_class().write_seg(np.asarray(segmentation, dtype=np.uint8), str(tmp), properties)
    os.replace(tmp, output_dir / f"{case}{MASK_ENDING}")
    return predictor.last_subtype_probabilities


def predict_folder(model_dir: Path, input_dir: Path, output_dir: Path, folds: list[str] | None = None,
                   checkpoint: str | None = None, device: torch.device = CPU,
                   mode: PredictionMode = PredictionMode(), overwrite: bool = False,
                   progress: bool = True, part: Part | None = None) -> PredictionReport:
    """Predict every case (or one ``part`` of them); finished cases of an earlier run are kept unless ``overwrite``.

    A case that fails is reported and the others are still predicted. A part keeps its subtype tables and manifest
    in its own folder (:mod:`~nnunet_mtl.inference.parts`); ``submission`` gathers the parts.
    """
    from tqdm import tqdm

    all_cases = check_folders(input_dir, output_dir)
    cases = part.select(all_cases) if part else all_cases
    tables = part.folder(output_dir) if part else output_dir
    tables.mkdir(parents=True, exist_ok=True)
    predictor = load_predictor(model_dir, folds, checkpoint, device, mode)
    keep_largest = read_decision(model_dir) if mode.largest_component is None else mode.largest_component
    probabilities = {} if overwrite else read_probability_table(tables)
    report = PredictionReport()
    settings = {"model": model_dir.resolve().name, "folds": folds, "checkpoint": checkpoint, **asdict(mode)}

    def record_part() -> None:
        if part:
            write_manifest(output_dir, part, list(all_cases), report.skipped + report.predicted, report.failed,
                           settings)

    record_part()
    bar = tqdm(cases.items(), desc="predicting", unit="case", disable=not progress, dynamic_ncols=True)
    for case, image_file in bar:
        bar.set_postfix_str(case)
        if case in probabilities and (output_dir / f"{case}{MASK_ENDING}").is_file():
            report.skipped.append(case)
            continue
        start = time.perf_counter()
        try:
            check_image(image_file)
            case_probabilities = predict_case(predictor, image_file, output_dir, case, keep_largest)
        except Exception as e:  # one bad case must not stop the others; all failures are listed at the end
            report.failed[case] = f"{image_file.name}: {e}" if image_file.name not in str(e) else str(e)
            probabilities.pop(case, None)
            record_part()
            continue
        report.seconds_per_case[case] = time.perf_counter() - start
        report.predicted.append(case)
        if case_probabilities is not None:
            probabilities[case] = case_probabilities
            write_subtype_tables(tables, probabilities)
        record_part()
    return report
