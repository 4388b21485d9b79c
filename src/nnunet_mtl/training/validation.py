"""Case-level validation of the multi-task trainer: whole validation cases, as the task scores them.

Patch-level numbers flatter the classifier (a random patch may show no lesion); these are what the task measures.

Overrides of :class:`nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer` (mixed into
:class:`~nnunet_mtl.training.trainer.nnUNetTrainerMTL`):

- ``perform_actual_validation``: nnU-Net's hard-codes the stock predictor, which fails on a network with two
  outputs; ours predicts masks and subtypes of the validation fold, exports them in the original geometry, stores
  each case's subtype record (and, with ``shift_calibration``, the head's logits of each case under acquisition
  shifts: :mod:`~nnunet_mtl.training.shift_calibration`) and fits the subtype classifier
  (:mod:`~nnunet_mtl.training.subtype_fit`), decides the largest-component postprocessing (as nnU-Net does after
  validation), then the false-lesion filters (:mod:`nnunet_mtl.inference.lesion_filters`), stores the evidence for
  deciding both over several folds (:mod:`~nnunet_mtl.training.fold_decisions`), and scores the fold as the task
  defines.

New here: :meth:`CaseValidationMixin.case_level_validation`, run during training to pick the best checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from time import time

import numpy as np
import torch
from nnunetv2.paths import nnUNet_raw
from nnunetv2.utilities.helpers import empty_cache
from sklearn.metrics import accuracy_score, f1_score
from torch import distributed as dist

from nnunet_mtl.evaluation.lesions import match_case
from nnunet_mtl.evaluation.metrics import dice
from nnunet_mtl.inference import lesion_filters, postprocessing
from nnunet_mtl.inference.lesion_candidates import find_candidates, lesion_facts, write_candidates_table
from nnunet_mtl.inference.outputs import write_subtype_tables
from nnunet_mtl.inference.predict import PredictionMode
from nnunet_mtl.inference.predictor import MultiTaskPredictor
from nnunet_mtl.inference.subtype import describe_case
from nnunet_mtl.model.subtype_classifier import load_classifier, softmax
from nnunet_mtl.tempfiles import owner_tag, remove_stale
from nnunet_mtl.training.fold_decisions import save_evidence
from nnunet_mtl.training.shift_calibration import ACQUISITION_SHIFTS, shifted_cases
from nnunet_mtl.training.subtype_fit import MIN_CASES_PER_CLASS, fit_from_model_folder, save_records

LESION_LABEL = 2


def combined_score(pancreas_dice: float, lesion_dice: float, macro_f1: float) -> float:
    """Checkpoint selection: half segmentation (mean of the two Dice), half classification (macro-F1)."""
    return 0.5 * (pancreas_dice + lesion_dice) / 2 + 0.5 * macro_f1


class CaseValidationMixin:
    """Whole-case validation for nnUNetTrainerMTL (see the module docstring)."""

    def _predictor(self, fast: bool) -> MultiTaskPredictor:
        """Default: nnU-Net's settings (step 0.5, mirroring); fast: the predictor's fast mode."""
        mode = PredictionMode.fast() if fast else PredictionMode()
        predictor = MultiTaskPredictor(tile_step_size=mode.tile_step_size, use_gaussian=True,
                                       use_mirroring=mode.use_mirroring,
                                       single_pass_max_patches=mode.single_pass_max_patches,
                                       aggregation=mode.aggregation, lesion_tile_mirroring=mode.lesion_tile_mirroring,
                                       perform_everything_on_device=self.device.type == "cuda",
                                       device=self.device, verbose=False, allow_tqdm=False)
        predictor.manual_initialization(self.network, self.plans_manager, self.configuration_manager, None,
                                        self.dataset_json, self.__class__.__name__,
                                        self.inference_allowed_mirroring_axes)
        return predictor

    def _validation_dataset(self, keys: list[str]):
        return self.dataset_class(self.preprocessed_dataset_folder, keys,
                                  folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)

    @torch.no_grad()
    def case_level_validation(self) -> dict[str, float]:
        """Whole validation cases in fast mode: subtype and Dice per case.

        Dice is computed on the preprocessed grid, which is enough to rank epochs.
        """
        _, val_keys = self.do_split()
        if self.is_ddp:
            val_keys = val_keys[self.local_rank::dist.get_world_size()]
        dataset = self._validation_dataset(val_keys)
        predictor = self._predictor(fast=True)
        self.set_deep_supervision_enabled(False)
        self.network.eval()
        rows = []
        try:
            for key in dataset.identifiers:
                data, seg, _, _ = dataset.load_case(key)
                logits, probabilities = predictor.predict_with_current_weights(torch.from_numpy(np.asarray(data)))
                predicted = predictor.crop_labels(logits)  # on CUDA the tiled logits stay on the device
                truth = np.asarray(seg)[0]
                rows.append((self.case_subtypes[key], int(np.argmax(probabilities)),
                             dice(predicted > 0, truth > 0), dice(predicted == LESION_LABEL, truth == LESION_LABEL)))
        finally:
            self.set_deep_supervision_enabled(True)
            self.network.train()
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = [r for g in gathered for r in g]
        truth, predicted, pancreas, lesion = (list(c) for c in zip(*rows))
        return {"val_cls_accuracy": float(accuracy_score(truth, predicted)),
                "val_cls_macro_f1": float(f1_score(truth, predicted, average="macro",
                                                   labels=list(range(len(self.subtype_names))), zero_division=0)),
                "val_case_pancreas_dice": float(np.mean(pancreas)), "val_case_lesion_dice": float(np.mean(lesion))}

    def _features_can_be_fitted(self, keys: list[str], what: str) -> bool:
        """Whether these cases hold MIN_CASES_PER_CLASS of every subtype. Below that no feature model is fitted
        whatever the masks look like, so records skip the radiomics (most of a record's time) and keep the head's
        logits; the log says so."""
        per_subtype = np.bincount([self.case_subtypes[k] for k in keys], minlength=len(self.subtype_names))
        if per_subtype.min() >= MIN_CASES_PER_CLASS:
            return True
        self.print_to_log_file(f"{what} per subtype {per_subtype.tolist()}: fewer than {MIN_CASES_PER_CLASS} of some "
                               "subtype, so no feature model; their lesion features are not computed")
        return False

    def _predict_record(self, predictor: MultiTaskPredictor, key: str, data,
                        with_features: bool) -> tuple[torch.Tensor, dict]:
        """Predict one preprocessed case; return its logits and its subtype record (head logits per fold, the
        predicted lesion's features unless ``with_features`` is False) for fitting the subtype classifier."""
        logits, _ = predictor.predict_with_current_weights(torch.from_numpy(np.asarray(data)))
        described = describe_case(predictor.last_fold_logits, np.asarray(data), predictor.crop_labels(logits),
                                  self.configuration_manager.spacing, self.plans_manager, self.configuration_manager,
                                  classifier=None, with_features=with_features)
        record = {"case": key, "subtype": self.case_subtypes[key], "fold_logits": described.fold_logits.tolist(),
                  "features": described.features, "lesion_ml": described.lesion_ml}
        return logits, record

    @torch.no_grad()
    def shifted_validation_records(self) -> list[dict]:
        """The validation cases under each acquisition shift (training/shift_calibration.py), predicted whole in
        fast mode: the head's logits per case and shift (no features), for fitting the head's temperature."""
        _, val_keys = self.do_split()
        dataset = self._validation_dataset(val_keys)
        predictor = self._predictor(fast=True)
        scheme = self.configuration_manager.normalization_schemes[0]
        properties = self.plans_manager.foreground_intensity_properties_per_channel.get("0")
        records = []
        for index, key in enumerate(dataset.identifiers):
            data, _, _, _ = dataset.load_case(key)
            for name, shifted in shifted_cases(np.asarray(data), self.configuration_manager.spacing, properties,
                                               scheme, case_index=index):
                records.append({**self._predict_record(predictor, key, shifted, with_features=False)[1],
                                "shift": name})
        return records

    @torch.no_grad()
    def training_case_records(self) -> list[dict]:
        """The fold's own training cases as its final weights predict them (fast mode): what the feature classifier
        is fitted on when no out-of-fold predictions exist.

        Only the lesion features of these records are used (the head is calibrated on held-out cases), so when too
        few training cases of some subtype exist for a feature model, the cases are listed but not predicted."""
        train_keys, _ = self.do_split()
        if not self._features_can_be_fitted(train_keys, "training cases"):
            self.print_to_log_file("training cases not predicted: nothing could be fitted from their records")
            return [{"case": key, "subtype": self.case_subtypes[key], "fold_logits": None, "features": None,
                     "lesion_ml": None} for key in train_keys]
        dataset = self._validation_dataset(train_keys)
        predictor = self._predictor(fast=True)
        records = []
        for key in dataset.identifiers:
            data, _, _, _ = dataset.load_case(key)
            records.append(self._predict_record(predictor, key, data, with_features=True)[1])
        return records

    def _export_validation_case(self, logits: torch.Tensor, properties: dict, out: Path, key: str,
                                save_probabilities: bool) -> dict:
        """Write the case's mask (nnU-Net's export, with probabilities) and return the lesion evidence the filter
        choice needs: its scored lesion components, matched to the truth, without and with the largest component."""
        from batchgenerators.utilities.file_and_folder_operations import save_pickle
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        segmentation, class_probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits.float().cpu(), self.plans_manager, self.configuration_manager, self.label_manager, properties,
            return_probabilities=True)
        ending = self.dataset_json["file_ending"]
        tmp = out / f".{key}.{owner_tag()}{ending}"  # a killed run's leftover is removed by the next one
        self.plans_manager.image_reader_writer_class().write_seg(segmentation.astype(np.uint8), str(tmp), properties)
        os.replace(tmp, out / f"{key}{ending}")
        if save_probabilities:  # nnU-Net's files beside the mask, as its export writes them
            np.savez_compressed(out / f"{key}.npz", probabilities=class_probabilities)
            save_pickle(properties, str(out / f"{key}.pkl"))
        if class_probabilities.shape[0] <= LESION_LABEL:
            return {}
        truth_file = Path(self.preprocessed_dataset_folder_base) / "gt_segmentations" / f"{key}{ending}"
        truth, _ = self.plans_manager.image_reader_writer_class().read_seg(str(truth_file))
        evidence = {}
        for largest in (False, True):
            mask = postprocessing.keep_largest_component(segmentation) if largest else segmentation
            _, candidates = find_candidates(mask, class_probabilities[LESION_LABEL], properties["spacing"])
            evidence[largest] = (match_case(mask, truth[0], properties["spacing"], key,
                                            [(c.peak, c.score) for c in candidates]), candidates)
        return evidence

    def perform_actual_validation(self, save_probabilities: bool = False) -> dict | None:
        """Predict the validation fold (masks in original geometry + subtypes), decide the postprocessing on it and
        score it as the task does.

        On the way: each case's subtype record is stored (``subtype_records.json``), and with ``subtype_fit ==
        "fold"`` the subtype classifier is fitted (the fold's training cases predicted for the feature model) and
        saved into the model folder before the validation's subtypes are written with it.
        """
        from nnunet_mtl.evaluation.evaluate import evaluate_folder, headline

        self.set_deep_supervision_enabled(False)
        self.network.eval()
        predictor = self._predictor(fast=self.final_validation_fast)
        out = Path(self.output_folder) / "validation"
        out.mkdir(parents=True, exist_ok=True)
        remove_stale(out)  # temporaries of a killed earlier validation
        train_keys, val_keys = self.do_split()
        # Validation records feed the feature model's calibration and, over cross-validation folds, its out-of-fold
        # fit: both need enough labelled cases of every subtype in the pool the folds share.
        with_features = self._features_can_be_fitted([*train_keys, *val_keys], "labelled cases")
        dataset = self._validation_dataset(val_keys)
        records, evidence = [], {}
        with torch.no_grad():
            for key in dataset.identifiers:
                data, _, _, properties = dataset.load_case(key)
                logits, record = self._predict_record(predictor, key, data, with_features)
                records.append(record)
                evidence[key] = self._export_validation_case(logits, properties, out, key, save_probabilities)
        fold_dir, model_dir = Path(self.output_folder), Path(self.output_folder_base)
        if self.local_rank == 0:
            save_records(fold_dir, "validation", records)
            if self.shift_calibration:
                started = time()
                save_records(fold_dir, "validation_shifted", self.shifted_validation_records())
                self.print_to_log_file(f"validation cases under {len(ACQUISITION_SHIFTS)} acquisition shifts "
                                       f"predicted in {time() - started:.1f} s")
            if self.subtype_fit == "fold":
                started = time()
                save_records(fold_dir, "train", self.training_case_records())
                classifier = fit_from_model_folder(model_dir, self.subtype_names, [str(self.fold)],
                                                   self.feature_model_kind, self.feature_set)
                classifier.save(model_dir)
                self.print_to_log_file(f"subtype classifier fitted in {time() - started:.1f} s: "
                                       f"{json.dumps(classifier.provenance)}")
                for variant, numbers in classifier.validation.items():
                    if numbers:
                        self.print_to_log_file(f"  validation {variant}: " + ", ".join(
                            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers.items()))
        classifier = load_classifier(model_dir)
        probabilities = {}
        for record in records:
            if classifier is None:
                probabilities[record["case"]] = softmax(np.mean(record["fold_logits"], axis=0))
            else:
                variants = classifier.probabilities(record["fold_logits"], record["features"])
                probabilities[record["case"]] = variants[classifier.default_variant]
        self.set_deep_supervision_enabled(True)
        empty_cache(self.device)
        if self.local_rank != 0:
            write_subtype_tables(out, probabilities)
            return None
        keys = list(dataset.identifiers)
        truth = Path(self.preprocessed_dataset_folder_base) / "gt_segmentations"
        scores = postprocessing.task_scores(out, truth, keys)
        save_evidence(out, scores, evidence)  # for the decision over several folds (fold_decisions.py)
        decision = postprocessing.decide(scores)
        postprocessing.write_decision(model_dir, decision)
        self.print_to_log_file(f"largest-component postprocessing: {decision}")
        largest = decision["keep_largest_component"]
        if largest:
            postprocessing.apply_to_folder(out, keys)
        candidates = {key: [] for key in keys}
        if all(evidence.values()):
            cases = [evidence[key][largest] for key in keys]
            choice = lesion_filters.choose(cases, allow_outside_gland=not largest)
            lesion_filters.write_decision(model_dir, choice)
            self.print_to_log_file(f"false-lesion filters: {choice['description']}; validation "
                                   f"{json.dumps({k: choice['validation'][k] for k in ('cases', 'true_lesions')})}, "
                                   f"without: {choice['validation']['without_filters']}, "
                                   f"chosen: {choice['validation']['chosen']}")
            filters = lesion_filters.read_lesion_filters(model_dir)
            candidates = lesion_filters.apply_to_folder(out, {key: evidence[key][largest][1] for key in keys},
                                                        filters)
        write_candidates_table(out, candidates)
        write_subtype_tables(out, probabilities, {key: lesion_facts(candidates[key]) for key in keys})
        raw_dataset = Path(str(nnUNet_raw)) / self.plans_manager.dataset_name if nnUNet_raw.is_set() else None
        if raw_dataset is None or not raw_dataset.is_dir():
            self.print_to_log_file("raw dataset not found: validation predictions written, not scored")
            return None
        metrics = evaluate_folder(out, raw_dataset, fold=self.fold, out_dir=out)
        self.print_to_log_file("Validation (case level):", json.dumps(headline(metrics)),
                               also_print_to_console=True)
        return metrics
