"""Predict a folder of CT images: one mask per case in the input geometry, a subtype with probabilities per case.

The loop is per case and in-process: on a small machine nnU-Net's spawn pools cost seconds that a crop-sized case
does not need, and a per-case loop makes resuming and isolating bad files simple. It is a three-stage pipeline on
threads (as nnU-Net's own predictor overlaps preprocessing and export with the network, without its processes): the
next case is read and preprocessed, and the previous one exported and written, while the network runs on this one.
Preprocessing, the sliding window and resampling back to the original geometry are nnU-Net's own functions.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from nnunet_mtl.data.nifti import NiftiError, Volume, read_geometry, read_volume
from nnunet_mtl.inference import engines
from nnunet_mtl.inference.lesion_candidates import (
    CANDIDATES_CSV,
    Candidate,
    lesion_facts,
    read_candidates_table,
    write_candidates_table,
)
from nnunet_mtl.inference.lesion_filters import NO_FILTERS, LesionFilters, read_lesion_filters
from nnunet_mtl.inference.lesion_filters import postprocess as postprocess_lesions
from nnunet_mtl.inference.outputs import (
    MASK_ENDING,
    SUBTYPE_CSV,
    case_details,
    read_details,
    read_probability_table,
    write_subtype_tables,
)
from nnunet_mtl.inference.parts import Part, write_manifest
from nnunet_mtl.inference.postprocessing import keep_largest_component, read_decision
from nnunet_mtl.inference.predictor import MultiTaskPredictor
from nnunet_mtl.inference.resampling import prediction_configuration
from nnunet_mtl.inference.subtype import CaseSubtype, describe_case
from nnunet_mtl.model.subtype_classifier import load_classifier
from nnunet_mtl.paths import make_dirs
from nnunet_mtl.tempfiles import remove_stale, temp_path
from nnunet_mtl.training.checkpoints import CheckpointError, read_checkpoint

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
    classifier: str | None = None  # cnn | features | fused; None: the model's default (subtype_classifier.json)
    lesion_filters: LesionFilters | None = None  # None: as the model's validation decided
    engine: str = "torch"  # what runs the network: torch, openvino, onnxruntime or auto (inference/engines.py)
    precision: str = "fp32"  # fp32 or bf16 (CPUs with native bfloat16 only)
    lesion_tile_attention: str = "crop"  # the subtype patch attends to the crop's lesion ("tile": its own pass)
    lesion_tile_mirroring: bool = False  # mirror the subtype patch too (8 encoder passes in default mode)
    resampler: str = "plans"  # "torch": nnU-Net's torch resampler on the device (inference/resampling.py)

    @classmethod
    def fast(cls, aggregation: str = "lesion_tile", classify: bool = True,
             largest_component: bool | None = None, **options) -> PredictionMode:
        """No mirroring, tile step 1.0, single pass over small crops; ``options``: any other field."""
        return cls(use_mirroring=False, tile_step_size=1.0, single_pass_max_patches=8.0, aggregation=aggregation,
                   classify=classify, largest_component=largest_component, **options)


@dataclass
class PredictionReport:
    predicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # damaged outputs of an earlier run, predicted again
    seconds_per_case: dict[str, float] = field(default_factory=dict)


def list_cases(input_dir: Path) -> dict[str, Path]:
    """Case id -> image file, for ``<case>_0000.nii.gz`` files (single-channel CT); hidden files are not cases."""
    return {p.name[: -len(IMAGE_SUFFIX)]: p for p in sorted(input_dir.glob(f"*{IMAGE_SUFFIX}"))
            if not p.name.startswith(".")}


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


def read_image(path: Path) -> Volume:
    """The verified image (:mod:`nnunet_mtl.data.nifti`): what nnU-Net would report cryptically, or not at all (a
    cut .nii.gz reads as zeros, NaN as 0), is an error named with the file."""
    try:
        return read_volume(path, "image")
    except NiftiError as e:
        raise InputError(f"{path.name}: {e.problem}") from None


def finished_mask_problem(mask_file: Path, image_file: Path, n_labels: int) -> str | None:
    """Why a mask of an earlier run cannot be kept (damaged since, or not on the image's grid); None when intact."""
    try:
        mask = read_volume(mask_file, "mask")
        image = read_geometry(image_file, "image")
    except NiftiError as e:
        return f"{e.path.name}: {e.problem}"
    if mask.array.dtype != np.uint8 or mask.geometry.size != image.size or not (
            np.allclose(mask.geometry.spacing, image.spacing, rtol=1e-6) and
            np.allclose(mask.geometry.origin, image.origin, atol=1e-4) and
            np.allclose(mask.geometry.direction, image.direction, atol=1e-6)):
        return f"{mask_file.name}: not a uint8 mask on the grid of {image_file.name}"
    if int(mask.array.max(initial=0)) >= n_labels:
        return f"{mask_file.name}: labels beyond 0..{n_labels - 1}"
    return None


def find_checkpoints(model_dir: Path, folds: list[str] | None, checkpoint: str | None) -> list[Path]:
    if not (model_dir / "plans.json").is_file() or not (model_dir / "dataset.json").is_file():
        raise InputError(f"{model_dir} is not a trained model folder (needs plans.json, dataset.json, fold_*/)")
    fold_dirs = [model_dir / f"fold_{f}" for f in folds] if folds else sorted(model_dir.glob("fold_[0-9]*"))
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


def build_engine(mode: PredictionMode, network: torch.nn.Module, parameters: dict, patch_size, device: torch.device,
                 model_dir: Path, log=None) -> engines.Engine:
    """The engine ``mode`` names, exports cached in the model folder; ``auto`` measured once per model and CPU."""
    engines.check_engine(mode.engine, mode.precision, device)
    cache_dir = engines.engine_cache_dir(model_dir)
    name = mode.engine
    if name == "auto":
        name = "torch" if device.type != "cpu" else engines.choose_engine(
            network, engines.weights_key(parameters), tuple(patch_size), mode.precision, cache_dir, log=log or print)
    return engines.make_engine(name, mode.precision, device, cache_dir)


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
        try:
            state = read_checkpoint(path, hint=": choose one with --checkpoint NAME")
        except CheckpointError as e:
            raise InputError(str(e)) from None
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
    for path, weights in zip(checkpoints, parameters):
        try:
            network.load_state_dict(weights)
        except RuntimeError as e:
            raise InputError(f"{path}: its weights do not fit the network of {model_dir / 'plans.json'} "
                             f"({str(e).splitlines()[0]})") from None
    network.load_state_dict(parameters[0])
    network.eval()  # the head's dropout off for every caller, also one that classifies before any crop pass
    network.return_classification = mode.classify
    if mode.channels_last:
        network = network.to(memory_format=torch.channels_last_3d)
    engine = build_engine(mode, network, parameters[0], configuration_manager.patch_size, device, model_dir,
                          log=print if verbose or mode.engine == "auto" else None)
    predictor = MultiTaskPredictor(tile_step_size=mode.tile_step_size, use_gaussian=True,
                                   use_mirroring=mode.use_mirroring, perform_everything_on_device=True,
                                   device=device, verbose=verbose, allow_tqdm=False,
                                   aggregation=mode.aggregation, single_pass_max_patches=mode.single_pass_max_patches,
                                   channels_last=mode.channels_last, engine=engine,
                                   lesion_tile_attention=mode.lesion_tile_attention,
                                   lesion_tile_mirroring=mode.lesion_tile_mirroring)
    predictor.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                    "nnUNetTrainerMTL", tuple(mirror_axes) if mirror_axes is not None else None)
    predictor.subtype_classifier = load_classifier(model_dir) if mode.classify else None
    predictor.classifier_variant = mode.classifier
    if mode.classifier in ("features", "fused") and (predictor.subtype_classifier is None
                                                     or predictor.subtype_classifier.feature_model is None):
        raise InputError(f"{model_dir} has no fitted feature classifier (subtype_classifier.json): "
                         f"--classifier {mode.classifier} needs one; use --classifier cnn, or refit with "
                         "`nnunet-mtl fit-classifier`")
    return predictor


@dataclass
class PreparedCase:
    """A case read and preprocessed by nnU-Net, ready for the network."""

    case: str
    data: np.ndarray
    properties: dict


def prepare_case(predictor: MultiTaskPredictor, image_file: Path, case: str) -> PreparedCase:
    """Read the verified image and preprocess it with the plans' preprocessor (no shared state: runs on a thread)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    pm, cm = predictor.plans_manager, predictor.configuration_manager
    preprocessor = cm.preprocessor_class(verbose=False)
    volume = read_image(image_file)
    if pm.image_reader_writer_class is SimpleITKIO:  # the verified voxels, as nnU-Net's reader returns them
        data, properties = volume.nnunet_input()
        data, _, properties = preprocessor.run_case_npy(data, None, properties, pm, cm, predictor.dataset_json)
    else:  # another reader in the plans: nnU-Net reads the (verified) file itself
        del volume
        data, _, properties = preprocessor.run_case([str(image_file)], None, pm, cm, predictor.dataset_json)
    return PreparedCase(case, data, properties)


@dataclass
class InferredCase:
    """The network's output for a case: logits on the preprocessed grid, the head's logits per fold (None when the
    head is off) and the crop's label map."""

    logits: torch.Tensor
    fold_logits: np.ndarray | None
    labels: np.ndarray


def infer_case(predictor: MultiTaskPredictor, prepared: PreparedCase) -> InferredCase:
    """The network over the preprocessed case (the predictor's state is used here only: the calling thread)."""
    logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(prepared.data))
    fold_logits = None if predictor.last_fold_logits is None else np.array(predictor.last_fold_logits)
    return InferredCase(logits, fold_logits, predictor.crop_labels(logits))


def finish_case(predictor: MultiTaskPredictor, prepared: PreparedCase, inferred: InferredCase, output_dir: Path,
                keep_largest: bool = False, filters: LesionFilters = NO_FILTERS, torch_threads: int | None = None,
                ) -> tuple[CaseSubtype | None, list[Candidate]]:
    """The subtype from the head and the lesion, then back to the input's geometry, postprocess and write
    ``<case>.nii.gz`` atomically; return the subtype (None when the head is off) and the scored lesion components
    of the written mask. Reads only the predictor's plans and classifier, so it runs on a thread while the network
    predicts the next case. ``torch_threads``: what nnU-Net's export sets torch to for its duration (the caller's
    own count, so that an export on a thread leaves the network's threads as they are)."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    pm, cm = predictor.plans_manager, predictor.configuration_manager
    subtype = None
    if inferred.fold_logits is not None:
        subtype = describe_case(inferred.fold_logits, prepared.data, inferred.labels, cm.spacing, pm, cm,
                                predictor.subtype_classifier, predictor.classifier_variant)
    segmentation, class_probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
        inferred.logits, pm, cm, predictor.label_manager, prepared.properties, return_probabilities=True,
        num_threads_torch=torch_threads or torch.get_num_threads())
    if keep_largest:
        segmentation = keep_largest_component(segmentation)
    # the lesion components of the final mask, scored (and filtered, as the model's validation chose)
    segmentation, candidates = postprocess_lesions(segmentation, class_probabilities, prepared.properties["spacing"],
                                                   filters)
    final = output_dir / f"{prepared.case}{MASK_ENDING}"
    tmp = temp_path(final, MASK_ENDING)
    try:
        pm.image_reader_writer_class().write_seg(np.asarray(segmentation, dtype=np.uint8), str(tmp),
                                                 prepared.properties)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return subtype, candidates


def predict_case(predictor: MultiTaskPredictor, image_file: Path, output_dir: Path, case: str,
                 keep_largest: bool = False, filters: LesionFilters = NO_FILTERS,
                 ) -> tuple[CaseSubtype | None, list[Candidate]]:
    """One case, stage after stage: preprocess, predict, postprocess, write ``<case>.nii.gz`` atomically; return the
    subtype (None when the predictor runs segmentation only) and the scored lesion components of the written mask."""
    prepared = prepare_case(predictor, image_file, case)
    return finish_case(predictor, prepared, infer_case(predictor, prepared), output_dir, keep_largest, filters)


def predict_folder(model_dir: Path, input_dir: Path, output_dir: Path, folds: list[str] | None = None,
                   checkpoint: str | None = None, device: torch.device = CPU,
                   mode: PredictionMode = PredictionMode(), overwrite: bool = False,
                   progress: bool = True, part: Part | None = None) -> PredictionReport:
    """Predict every case (or one ``part`` of them); finished cases of an earlier run are kept unless ``overwrite``.

    A case that fails is reported and the others are still predicted. A kept mask is read again first (whole, on
    its image's grid); a damaged one is predicted again. Temporaries of a killed earlier run are removed; an output
    folder created here and left empty (every case failed) is removed. A part keeps its tables and manifest in its
    own folder (:mod:`~nnunet_mtl.inference.parts`); ``submission`` gathers the parts.
    """
    all_cases = check_folders(input_dir, output_dir)
    cases = part.select(all_cases) if part else all_cases
    engines.check_engine(mode.engine, mode.precision, device)  # refused by name before anything is written
    predictor = load_predictor(model_dir, folds, checkpoint, device, mode)
    keep_largest = read_decision(model_dir) if mode.largest_component is None else mode.largest_component
    filters = read_lesion_filters(model_dir) if mode.lesion_filters is None else mode.lesion_filters
    created = not output_dir.exists()
    make_dirs(output_dir)
    tables = part.folder(output_dir) if part else output_dir
    report = PredictionReport()
    settings = {"model": model_dir.resolve().name, "folds": folds, "checkpoint": checkpoint, **asdict(mode)}
    try:
        make_dirs(tables)
        remove_stale(output_dir)
        remove_stale(tables)
        probabilities = {} if overwrite else read_probability_table(tables, report.notes)
        details = {} if overwrite else {c: d for c, d in read_details(tables, report.notes).items()
                                        if c in probabilities}
        # a finished case has its lesion components recorded too (a folder of an older version: predicted again)
        candidates, recorded = {}, False
        if not overwrite and (tables / CANDIDATES_CSV).is_file():
            try:
                candidates, recorded = read_candidates_table(tables / CANDIDATES_CSV), True
            except ValueError as e:
                report.notes.append(f"{e}; every case is predicted again")
        n_labels = len(predictor.label_manager.all_labels)

        def write_tables() -> None:
            """Every table lists exactly the finished cases (none is created while no case has finished)."""
            if candidates or (tables / CANDIDATES_CSV).exists():
                write_candidates_table(tables, candidates)
            if probabilities or details or (tables / SUBTYPE_CSV).exists():
                write_subtype_tables(tables, probabilities,
                                     {c: lesion_facts(candidates.get(c, [])) for c in probabilities}, details)
            if part:
                write_manifest(output_dir, part, list(all_cases), report.skipped + report.predicted, report.failed,
                               settings)

        todo = {}
        for case, image_file in cases.items():
            mask_file = output_dir / f"{case}{MASK_ENDING}"
            if recorded and case in probabilities and case in details and mask_file.is_file():
                problem = finished_mask_problem(mask_file, image_file, n_labels)
                if problem is None:
                    report.skipped.append(case)
                    continue
                report.notes.append(f"{problem}; predicting {case} again")
                probabilities.pop(case)
                details.pop(case, None)
            todo[case] = image_file

        def finished(case: str, subtype: CaseSubtype | None, case_candidates: list[Candidate]) -> None:
            candidates[case] = case_candidates
            report.predicted.append(case)
            if subtype is not None:
                probabilities[case] = subtype.probabilities
                details[case] = case_details(subtype)
            write_tables()

        def failed(case: str, error: Exception) -> None:
            """One bad case must not stop the others; all failures are listed at the end."""
            name = todo[case].name
            report.failed[case] = f"{name}: {error}" if name not in str(error) else str(error)
            (output_dir / f"{case}{MASK_ENDING}").unlink(missing_ok=True)  # the outputs list exactly the finished
            probabilities.pop(case, None)
            details.pop(case, None)
            candidates.pop(case, None)
            write_tables()

        run_pipeline(predictor, todo, output_dir, keep_largest, filters, finished, failed, report.seconds_per_case,
                     progress)
        if part:
            write_tables()  # the manifest, also of a part whose cases were all finished earlier
    finally:
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()
    return report


def run_pipeline(predictor: MultiTaskPredictor, todo: dict[str, Path], output_dir: Path, keep_largest: bool,
                 filters: LesionFilters, finished, failed, seconds: dict[str, float], progress: bool = True) -> None:
    """Predict the cases of ``todo`` (case -> image) in order, three stages deep: the next case is read and
    preprocessed on one thread, and the previous one given its subtype, exported and written on another, while the
    network runs on this one in the calling thread. ``finished(case, subtype, candidates)`` and ``failed(case,
    error)`` are called in the calling thread, in case order; ``seconds[case]``: wall time since the case before it
    finished (their sum is the loop's wall time).

    On an interrupt the export in flight is finished and reported first (its mask is complete), then the stages stop.
    """
    from tqdm import tqdm

    queue = list(todo)
    threads = torch.get_num_threads()
    reader = ThreadPoolExecutor(1, thread_name_prefix="nnunet-mtl-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="nnunet-mtl-write")
    reads: dict[str, Future] = {}
    in_flight: tuple[str, Future] | None = None
    bar = tqdm(total=len(queue), desc="predicting", unit="case", disable=not progress, dynamic_ncols=True)
    clock = time.perf_counter()

    def read(index: int) -> None:
        if index < len(queue):
            case = queue[index]
            reads[case] = reader.submit(prepare_case, predictor, todo[case], case)

    def settle() -> None:
        """Wait for the export in flight and report its case."""
        nonlocal in_flight, clock
        if in_flight is None:
            return
        (case, export), in_flight = in_flight, None
        try:
            subtype, case_candidates = export.result()
        except Exception as e:
            failed(case, e)
        else:
            now = time.perf_counter()
            seconds[case], clock = now - clock, now
            finished(case, subtype, case_candidates)
        bar.update()

    try:
        read(0)
        for index, case in enumerate(queue):
            bar.set_postfix_str(case)
            read(index + 1)
            try:
                prepared = reads.pop(case).result()
                inferred = infer_case(predictor, prepared)
            except Exception as e:
                settle()
                failed(case, e)
                bar.update()
                continue
            settle()
            in_flight = (case, writer.submit(finish_case, predictor, prepared, inferred, output_dir, keep_largest,
                                             filters, threads))
            del prepared, inferred
        settle()
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        try:
            settle()  # interrupted: the case being written is finished and recorded before stopping
        finally:
            writer.shutdown(wait=True)
            bar.close()
