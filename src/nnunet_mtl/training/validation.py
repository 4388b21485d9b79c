"""Case-level validation of the multi-task trainer: whole validation cases, as the task scores them.

Patch-level numbers flatter the classifier (a random patch may show no lesion); these are what the task measures.

Overrides of :class:`nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer` (mixed into
:class:`~nnunet_mtl.training.trainer.nnUNetTrainerMTL`):

- ``perform_actual_validation``: nnU-Net's hard-codes the stock predictor, which fails on a network with two
  outputs; ours predicts masks and subtypes of the validation fold, exports them in the original geometry, decides
  the largest-component postprocessing on them (as nnU-Net does after validation) and scores them as the task
  defines.

New here: :meth:`CaseValidationMixin.case_level_validation`, run during training to pick the best checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.paths import nnUNet_raw
from nnunetv2.utilities.helpers import empty_cache
from sklearn.metrics import accuracy_score, f1_score
from torch import distributed as dist

from nnunet_mtl.evaluation.metrics import dice
from nnunet_mtl.inference import postprocessing
from nnunet_mtl.inference.outputs import write_subtype_tables
from nnunet_mtl.inference.predict import PredictionMode
from nnunet_mtl.inference.predictor import MultiTaskPredictor

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
                                       aggregation=mode.aggregation,
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
                predicted = logits.argmax(0).cpu().numpy()  # on CUDA the tiled logits stay on the device
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

    def perform_actual_validation(self, save_probabilities: bool = False) -> dict | None:
        """Predict the validation fold (masks in original geometry + subtypes) and score it as the task does."""
        from nnunet_mtl.evaluation.evaluate import evaluate_folder, headline

        self.set_deep_supervision_enabled(False)
        self.network.eval()
        predictor = self._predictor(fast=self.final_validation_fast)
        out = Path(self.output_folder) / "validation"
        out.mkdir(parents=True, exist_ok=True)
        _, val_keys = self.do_split()
        dataset = self._validation_dataset(val_keys)
        probabilities = {}
        with torch.no_grad():
            for key in dataset.identifiers:
                data, _, _, properties = dataset.load_case(key)
                logits, probabilities[key] = predictor.predict_with_current_weights(torch.from_numpy(np.asarray(data)))
                tmp = out / f".{key}.tmp"
                export_prediction_from_logits(logits.float().cpu(), properties, self.configuration_manager,
                                              self.plans_manager, self.dataset_json, str(tmp), save_probabilities)
                os.replace(out / f".{key}.tmp{self.dataset_json['file_ending']}",
                           out / f"{key}{self.dataset_json['file_ending']}")
        write_subtype_tables(out, probabilities)
        self.set_deep_supervision_enabled(True)
        empty_cache(self.device)
        if self.local_rank != 0:
            return None
        truth = Path(self.preprocessed_dataset_folder_base) / "gt_segmentations"
        decision = postprocessing.determine(out, truth, list(dataset.identifiers))
        postprocessing.write_decision(Path(self.output_folder_base), decision)
        self.print_to_log_file(f"largest-component postprocessing: {decision}")
        if decision["keep_largest_component"]:
            postprocessing.apply_to_folder(out, list(dataset.identifiers))
        raw_dataset = Path(str(nnUNet_raw)) / self.plans_manager.dataset_name if nnUNet_raw.is_set() else None
        if raw_dataset is None or not raw_dataset.is_dir():
            self.print_to_log_file("raw dataset not found: validation predictions written, not scored")
            return None
        metrics = evaluate_folder(out, raw_dataset, fold=self.fold, out_dir=out)
        self.print_to_log_file("Validation (case level):", json.dumps(headline(metrics)),
                               also_print_to_console=True)
        return metrics
