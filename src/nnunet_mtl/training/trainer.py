"""The multi-task trainer: nnU-Net's trainer with a subtype loss, case-level validation and safe checkpoints.

Split by concern: :mod:`~nnunet_mtl.training.optim` (optimizer and schedule), :mod:`~nnunet_mtl.training.checkpoints`
(``save_checkpoint`` / ``load_checkpoint``), :mod:`~nnunet_mtl.training.validation` (case-level validation and
``perform_actual_validation``); this module holds the class and the training loop.

Overrides of :class:`nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer` here (and why):

- ``__init__``: same signature (nnU-Net records it through ``locals()``); multi-task settings are attributes, and
  the extra metric keys are registered with nnU-Net's local logger, which accepts only known keys.
- ``build_network_architecture``: nnU-Net builds our network from the plans; its own inference code builds it
  without deep supervision and expects one tensor, so such a network answers segmentation only.
- ``configure_optimizers``: nnU-Net's SGD and poly schedule (or AdamW), the head in its own parameter group at
  ``head_lr_scale`` x the rate (:mod:`~nnunet_mtl.training.optim` says why).
- ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``: nnU-Net's, optionally without mirroring and
  with a smaller rotation range. CT crops come in one patient orientation, so left-right mirrored anatomy is
  never seen at prediction; a short run should not spend capacity on it (demo only; default unchanged).
- ``initialize``: adds the subtype loss (class weights, label smoothing) and freezing of parts.
- ``_build_loss``: nnU-Net's Dice + CE with deep supervision; optionally lesion voxels weigh
  ``lesion_loss_weight`` times more in the CE (issue 17: small lesions are a few dozen of a patch's voxels).
- ``get_dataloaders``: nnU-Net hard-codes its loader class here; ours adds the subtype and lesion-centred patches,
  optionally per-case draw probabilities (subtype balance, small-lesion oversampling: training/dataloader.py), and
  optionally scanner-shift intensity augmentation after nnU-Net's spatial transform (training/augmentation.py).
- ``train_step`` / ``validation_step``: joint loss = nnU-Net's Dice+CE (deep supervision) + w x CE(subtype);
  options: the subtype loss over patches that show lesion only, and the attention head attending to the true
  lesion while training, optionally drawn badly in a share of patches (training/attention.py). Opt-in
  (``cpu_bf16``): bfloat16 autocast on CPU, where nnU-Net uses none; 1.6x faster per step here, but it gave
  non-finite convolution weight gradients on small networks, so such steps are skipped (as nnU-Net's GradScaler
  skips fp16 overflow steps on CUDA) and it stays off by default.
- ``on_train_epoch_end`` / ``on_validation_epoch_end``: log the loss parts and case-level validation numbers;
  nnU-Net's logger wants a value per epoch and key, so epochs without case-level validation log NaN (null in
  ``training_curves.json``) instead of repeating the last measurement.
- ``run_training``: the same loop with a progress bar.
- ``on_epoch_end``: best checkpoint by a combined score instead of segmentation pseudo-Dice alone; a checkpoint
  every epoch (atomic) so an interrupted run loses nothing; curves as JSON and PNG.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from time import time

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn
from torch import distributed as dist
from torch._dynamo import OptimizedModule

from nnunet_mtl.hardware import cpu_has_fast_bf16
from nnunet_mtl.model.network import MultiTaskUNet, load_segmentation_weights
from nnunet_mtl.training.attention import imperfect_attention
from nnunet_mtl.training.augmentation import with_intensity_augmentation, with_lesion_contrast, with_thick_slices
from nnunet_mtl.training.checkpoints import CheckpointMixin, read_checkpoint, to_plain
from nnunet_mtl.training.dataloader import MultiTaskDataLoader, case_sampling_probabilities
from nnunet_mtl.training.optim import ADAMW_DEFAULT_LR, OPTIMIZERS, build_optimizer
from nnunet_mtl.training.validation import CaseValidationMixin, combined_score

EXTRA_LOG_KEYS = ("train_seg_losses", "train_cls_losses", "val_seg_losses", "val_cls_losses",
                  "val_cls_accuracy", "val_cls_macro_f1", "val_case_pancreas_dice", "val_case_lesion_dice",
                  "combined_score", "ema_combined_score")
FREEZABLE_PARTS = ("encoder", "decoder", "head")
LESION_LABEL = 2
__all__ = ["ADAMW_DEFAULT_LR", "OPTIMIZERS", "nnUNetTrainerMTL", "cpu_has_fast_bf16"]
COMBINED_EMA = 0.8  # weight of the previous measurement; short runs need a faster average than nnU-Net's 0.9
CASE_LEVEL_KEYS = ("val_case_pancreas_dice", "val_case_lesion_dice", "val_cls_accuracy", "val_cls_macro_f1")
NOT_MEASURED = float("nan")


class nnUNetTrainerMTL(CaseValidationMixin, CheckpointMixin, nnUNetTrainer):
    extra_log_keys = EXTRA_LOG_KEYS

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's signature, kept exactly)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if "case_subtypes" not in dataset_json:
            raise ValueError("dataset.json has no 'case_subtypes': import the dataset with `nnunet-mtl import`")
        self.case_subtypes = {k: int(v) for k, v in dataset_json["case_subtypes"].items()}
        names = dataset_json.get("subtype_names") or {str(i): str(i) for i in sorted(set(self.case_subtypes.values()))}
        self.subtype_names = [names[str(i)] for i in range(len(names))]
        # Multi-task settings; the CLI sets them after construction, before initialize().
        self.classification_loss_weight = 0.3
        self.class_weighting = "inverse_frequency"  # or "none"
        self.label_smoothing = 0.0
        self.lesion_centred_sampling = True
        self.class_balanced_sampling = False
        self.small_lesion_oversampling = 1.0  # > 1: draw cases with a lesion under 1 ml up to this many times as often
        self.frozen_parts: tuple[str, ...] = ()
        self.head_lr_scale = 0.1
        # With the all-stage attention head: phantom test macro-F1 0.35-0.70 over seven runs (36 cases, README),
        # against 0.20-0.38 with both off (12 cases), segmentation unchanged.
        self.subtype_loss_on_lesion_patches_only = True
        self.attend_to_true_lesion = True
        self.imperfect_attention = 0.0  # share of training patches whose head attention is drawn badly (attention.py)
        self.cpu_bf16 = False
        self.optimizer_name = "sgd"  # or "adamw"
        self.mirror_augmentation = True
        self.intensity_augmentation = "nnunet"  # or "scanner": see training/augmentation.py
        self.thick_slice_mm = 0.0  # > the plans' z spacing: simulate slices up to this thick (augmentation.py)
        self.lesion_contrast_augmentation = False  # scale each lesion's contrast with the gland (augmentation.py)
        self.max_rotation_degrees: float | None = None  # None: nnU-Net's range (30 degrees here, 180 in 2D)
        self.lesion_loss_weight = 1.0
        self.skipped_steps = 0
        # Whole-case validation (the combined score that picks the best checkpoint) every 10 epochs, the first and
        # last included: at full size it costs about 128 s on the report's GPU (rehearsal: 36 cases in 784 s on CPU,
        # 662 s of it network), +78 % of a 165 s epoch if run every epoch, +7.8 % every 10 (bench/real_scale.py).
        self.case_validation_every = 10
        self.final_validation_fast = False
        # "fold": fit the subtype classifier after this fold's validation (one-fold training); "none": leave it to
        # the out-of-fold fit after all cross-validation folds (train --folds ...)
        self.subtype_fit = "fold"
        # fit the head's temperature on the validation cases also under acquisition shifts (shift_calibration.py)
        self.shift_calibration = True
        self.feature_model_kind = "lda"
        self.feature_set = "all"
        self.save_every = 1
        self.classification_loss: nn.Module | None = None
        self._best_combined: float | None = None
        self.plot_every_seconds = 60.0
        self._last_plot: float | None = None  # when the progress figures were last drawn (not checkpointed)
        for key in EXTRA_LOG_KEYS:
            self.logger.local_logger.my_fantastic_logging[key] = []

    # ----------------------------------------------------------------------------------------------- network
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        network = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                           num_output_channels, enable_deep_supervision)
        if not isinstance(network, MultiTaskUNet):
            raise TypeError(f"plans {plans_manager.plans_name} do not describe a multi-task network; "
                            "use the plans written by `nnunet-mtl plan`")
        network.return_classification = enable_deep_supervision
        return network

    @property
    def model(self) -> MultiTaskUNet:
        """The network without DDP / torch.compile wrappers."""
        module = self.network.module if self.is_ddp else self.network
        return module._orig_mod if isinstance(module, OptimizedModule) else module

    def initialize(self) -> None:
        if self.label_manager.has_regions or self.label_manager.has_ignore_label:
            raise ValueError("multi-task training supports plain label maps (no regions, no ignore label)")
        super().initialize()
        self.model.return_classification = True
        train_keys, _ = self.do_split()
        weights = None
        if self.class_weighting == "inverse_frequency":
            counts = np.bincount([self.case_subtypes[k] for k in train_keys], minlength=len(self.subtype_names))
            weights = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)
        elif self.class_weighting != "none":
            raise ValueError(f"unknown class weighting {self.class_weighting!r}")
        self.classification_loss = nn.CrossEntropyLoss(
            weight=weights.to(self.device) if weights is not None else None, label_smoothing=self.label_smoothing,
            reduction="none")
        self.lesion_label_present = LESION_LABEL in self.label_manager.foreground_labels
        self.freeze(self.frozen_parts)
        if self.device.type == "cpu" and self.cpu_bf16 and not cpu_has_fast_bf16():
            self.print_to_log_file("warning: bfloat16 autocast asked for on a CPU without native bfloat16 (slower)")
        rotation = "nnU-Net's" if self.max_rotation_degrees is None else f"{self.max_rotation_degrees} degrees"
        self.print_to_log_file(f"multi-task: subtypes {self.subtype_names}, class weights {weights}, "
                               f"cls weight {self.classification_loss_weight}, frozen {self.frozen_parts}; "
                               f"optimizer {self.optimizer_name} at {self.initial_lr}, mirroring "
                               f"{self.mirror_augmentation}, rotation limit {rotation}, "
                               f"CPU bfloat16 {self.cpu_bf16 and self.device.type == 'cpu'}, lesion CE weight "
                               f"{self.lesion_loss_weight}, intensity augmentation {self.intensity_augmentation}, "
                               f"thick slices up to {self.thick_slice_mm} mm, lesion contrast augmentation "
                               f"{self.lesion_contrast_augmentation}, small-lesion oversampling "
                               f"{self.small_lesion_oversampling}")

    def _build_loss(self):
        """nnU-Net's loss; with ``lesion_loss_weight`` != 1 its cross-entropy weighs lesion voxels that much more."""
        loss = super()._build_loss()
        if self.lesion_loss_weight != 1.0:
            if self.lesion_loss_weight <= 0:
                raise ValueError(f"lesion loss weight must be > 0, got {self.lesion_loss_weight}")
            inner = loss.loss if isinstance(loss, DeepSupervisionWrapper) else loss
            weight = torch.ones(self.label_manager.num_segmentation_heads)
            weight[LESION_LABEL] = self.lesion_loss_weight
            inner.ce.weight = weight.to(self.device)  # nn.CrossEntropyLoss's own class-weight buffer
        return loss

    def configure_optimizers(self):
        head = list(self.model.classifier.parameters())
        head_ids = {id(p) for p in head}
        body = [p for p in self.network.parameters() if id(p) not in head_ids]
        return build_optimizer(body, head, self.optimizer_name, self.initial_lr, self.weight_decay,
                               self.head_lr_scale, self.num_epochs)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """nnU-Net's choice, then our two demo options: no mirroring, a narrower rotation range."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if self.max_rotation_degrees is not None:
            limit = float(np.deg2rad(self.max_rotation_degrees))
            rotation = (-limit, limit)
            patch_size = self.configuration_manager.patch_size
            initial_patch_size = get_patch_size(patch_size, rotation, rotation, rotation, (0.85, 1.25))
            if dummy_2d:
                initial_patch_size[0] = patch_size[0]
        if not self.mirror_augmentation:
            mirror_axes = None
            self.inference_allowed_mirroring_axes = None  # a network never shown mirrored data is not mirrored
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def freeze(self, parts: tuple[str, ...]) -> None:
        """Stop gradients to whole parts (fine-tuning one task); frozen weights then never change."""
        unknown = set(parts) - set(FREEZABLE_PARTS)
        if unknown:
            raise ValueError(f"cannot freeze {sorted(unknown)}; parts are {FREEZABLE_PARTS}")
        model = self.model
        encoder_ids = {id(p) for p in model.encoder.parameters()}
        groups = {"encoder": list(model.encoder.parameters()),
                  "decoder": [p for p in model.decoder.parameters() if id(p) not in encoder_ids],
                  "head": list(model.classifier.parameters())}
        for part in parts:
            for p in groups[part]:
                p.requires_grad_(False)

    def load_initial_weights(self, checkpoint_path: str | Path) -> list[str]:
        """Start from our checkpoint or a segmentation-only nnU-Net one; returns the head keys left fresh."""
        checkpoint = read_checkpoint(checkpoint_path, required=())
        fresh = load_segmentation_weights(self.model, checkpoint.get("network_weights", checkpoint))
        self.print_to_log_file(f"initial weights from {checkpoint_path}; left fresh: {fresh or 'nothing'}")
        return fresh

    # ------------------------------------------------------------------------------------------------- data
    def _case_sampling(self, dataset, lesion_label: int | None) -> np.ndarray | None:
        """Draw probabilities of the training cases (None: nnU-Net's uniform draw); lesion volumes are counted on the
        preprocessed masks, at the plans' spacing, only when small-lesion oversampling asks for them."""
        identifiers = list(dataset.identifiers)
        volumes = None
        if self.small_lesion_oversampling != 1.0 and lesion_label is not None:
            voxel_ml = float(np.prod(self.configuration_manager.spacing)) / 1000.0
            volumes = [float((np.asarray(dataset.load_case(k)[1][:]) == lesion_label).sum()) * voxel_ml
                       for k in identifiers]
            ml = {k: round(v, 3) for k, v in zip(identifiers, volumes)}
            self.print_to_log_file(f"small-lesion oversampling x{self.small_lesion_oversampling}: lesion ml {ml}")
        factor = self.small_lesion_oversampling if volumes is not None else 1.0
        return case_sampling_probabilities(identifiers, self.case_subtypes, self.class_balanced_sampling, volumes,
                                           factor)

    def get_dataloaders(self):
        """nnU-Net's get_dataloaders with our loader class (nnU-Net hard-codes its own there)."""
        if self.dataset_class is None:
            from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        ds_scales = self._get_deep_supervision_scales()
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        labels = self.label_manager.foreground_labels
        tr_transforms = self.get_training_transforms(
            patch_size, rotation, ds_scales, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=labels, regions=None, ignore_label=None)
        tr_transforms = with_intensity_augmentation(tr_transforms, self.intensity_augmentation)
        tr_transforms = with_thick_slices(tr_transforms, self.thick_slice_mm, self.configuration_manager.spacing[0])
        tr_transforms = with_lesion_contrast(tr_transforms, self.lesion_contrast_augmentation)
        val_transforms = self.get_validation_transforms(ds_scales, is_cascaded=self.is_cascaded,
                                                        foreground_labels=labels, regions=None, ignore_label=None)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        lesion_label = LESION_LABEL if LESION_LABEL in labels else None
        sampling = self._case_sampling(dataset_tr, lesion_label)
        common = dict(oversample_foreground_percent=self.oversample_foreground_percent, pad_sides=None,
                      probabilistic_oversampling=self.probabilistic_oversampling, case_subtypes=self.case_subtypes,
                      lesion_label=lesion_label, lesion_centred=self.lesion_centred_sampling)
        dl_tr = MultiTaskDataLoader(dataset_tr, self.batch_size, initial_patch_size, patch_size, self.label_manager,
                                    sampling_probabilities=sampling, transforms=tr_transforms, **common)
        dl_val = MultiTaskDataLoader(dataset_val, self.batch_size, patch_size, patch_size, self.label_manager,
                                     sampling_probabilities=None, transforms=val_transforms, **common)
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            return SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        pin = self.device.type == "cuda"
        mt_train = NonDetMultiThreadedAugmenter(dl_tr, None, n_proc, max(6, n_proc // 2), None, pin, 0.002)
        mt_val = NonDetMultiThreadedAugmenter(dl_val, None, max(1, n_proc // 2), max(3, n_proc // 4), None, pin,
                                              0.002)
        next(mt_train), next(mt_val)  # start the workers now, as nnU-Net does
        return mt_train, mt_val

    # --------------------------------------------------------------------------------------------- training
    def _to_device(self, batch: dict):
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        return data, target, batch["subtype"].to(self.device, non_blocking=True)

    def _autocast(self):
        """nnU-Net's fp16 autocast on CUDA; bfloat16 on a CPU that has it (nnU-Net uses none on CPU)."""
        if self.device.type == "cuda":
            return autocast("cuda", enabled=True)
        if self.device.type == "cpu" and self.cpu_bf16:
            return autocast("cpu", dtype=torch.bfloat16)
        return dummy_context()

    def _joint_loss(self, data, target, subtype, attend_to_true_lesion: bool = False,
                    subtype_counts: torch.Tensor | None = None):
        full_target = target[0] if isinstance(target, list) else target
        lesion_mask = self.model.attention_from_labels(full_target) \
            if attend_to_true_lesion and self.lesion_label_present and self.model.attends else None
        if lesion_mask is not None and self.imperfect_attention > 0:
            true_attention, share = lesion_mask, self.imperfect_attention
            segmentation, logits = self.network(data, attention_from=lambda predicted: imperfect_attention(
                true_attention, predicted, share))
        elif lesion_mask is not None:
            segmentation, logits = self.network(data, lesion_mask=lesion_mask)
        else:
            segmentation, logits = self.network(data)
        if self.device.type == "cpu" and self.cpu_bf16:  # losses in fp32: bfloat16 has 8 bits of mantissa
            segmentation = [s.float() for s in segmentation] if isinstance(segmentation, (list, tuple)) \
                else segmentation.float()
        seg_loss = self.loss(segmentation, target)
        cls_loss = self._subtype_loss(logits.float(), subtype, full_target, subtype_counts)
        return segmentation, logits, seg_loss, cls_loss, seg_loss + self.classification_loss_weight * cls_loss

    def _subtype_loss(self, logits: torch.Tensor, subtype: torch.Tensor, target: torch.Tensor,
                      subtype_counts: torch.Tensor | None = None) -> torch.Tensor:
        """Subtype CE, a weighted mean as nn.CrossEntropyLoss computes it; optionally over the patches that show
        lesion only: a patch without it carries no evidence of the subtype (public attempts' lesson). Patches with
        ``subtype_counts`` 0 (their lesion's contrast moved by the augmentation) are left out."""
        per_sample = self.classification_loss(logits, subtype)  # reduction="none": w[subtype] x CE already
        weight = self.classification_loss.weight[subtype] if self.classification_loss.weight is not None \
            else torch.ones_like(per_sample)
        counted = torch.ones_like(per_sample)
        if self.subtype_loss_on_lesion_patches_only and self.lesion_label_present:
            counted = (target == LESION_LABEL).flatten(1).any(dim=1).to(per_sample.dtype)
        if subtype_counts is not None:
            counted = counted * subtype_counts.to(per_sample.device, per_sample.dtype)
        return (per_sample * counted).sum() / (weight * counted).sum().clamp_min(1e-6)

    def train_step(self, batch: dict) -> dict:
        data, target, subtype = self._to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            _, _, seg_loss, cls_loss, loss = self._joint_loss(data, target, subtype, self.attend_to_true_lesion,
                                                              batch.get("subtype_counts"))
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            if self.cpu_bf16 and not torch.isfinite(norm):
                self.skipped_steps += 1  # bfloat16 gave a non-finite gradient: skip the step, keep the weights
            else:
                self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy(), "seg_loss": seg_loss.detach().cpu().numpy(),
                "cls_loss": cls_loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        data, target, subtype = self._to_device(batch)
        with self._autocast():
            segmentation, _, seg_loss, cls_loss, loss = self._joint_loss(data, target, subtype)
        if self.enable_deep_supervision:
            segmentation, target = segmentation[0], target[0]
        # nnU-Net's online pseudo-Dice (plain labels): argmax one-hot against the target, background dropped.
        predicted = torch.zeros(segmentation.shape, device=segmentation.device, dtype=torch.float16)
        predicted.scatter_(1, segmentation.argmax(1)[:, None], 1)
        tp, fp, fn, _ = get_tp_fp_fn_tn(predicted, target, axes=[0] + list(range(2, segmentation.ndim)))
        return {"loss": loss.detach().cpu().numpy(), "seg_loss": seg_loss.detach().cpu().numpy(),
                "cls_loss": cls_loss.detach().cpu().numpy(), "tp_hard": tp.detach().cpu().numpy()[1:],
                "fp_hard": fp.detach().cpu().numpy()[1:], "fn_hard": fn.detach().cpu().numpy()[1:]}

    def _mean_over_workers(self, values) -> float:
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, values)
            return float(np.mean(np.concatenate([np.atleast_1d(g) for g in gathered])))
        return float(np.mean(values))

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        self.logger.log("train_seg_losses", self._mean_over_workers(outputs["seg_loss"]), self.current_epoch)
        self.logger.log("train_cls_losses", self._mean_over_workers(outputs["cls_loss"]), self.current_epoch)
        if self.skipped_steps:
            self.print_to_log_file(f"bfloat16: {self.skipped_steps} steps skipped so far (non-finite gradients)")

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        outputs = collate_outputs(val_outputs)
        self.logger.log("val_seg_losses", self._mean_over_workers(outputs["seg_loss"]), self.current_epoch)
        self.logger.log("val_cls_losses", self._mean_over_workers(outputs["cls_loss"]), self.current_epoch)
        if self.case_validation_due():
            case_metrics = self.case_level_validation()
            score = combined_score(case_metrics["val_case_pancreas_dice"], case_metrics["val_case_lesion_dice"],
                                   case_metrics["val_cls_macro_f1"])
            measured = [v for v in self.logger.get_value("ema_combined_score", step=None) if not np.isnan(v)]
            ema = score if not measured else COMBINED_EMA * measured[-1] + (1 - COMBINED_EMA) * score
        else:  # nnU-Net's logger wants one value per epoch and key: NaN says "not measured in this epoch"
            case_metrics, score, ema = dict.fromkeys(CASE_LEVEL_KEYS, NOT_MEASURED), NOT_MEASURED, NOT_MEASURED
        for key, value in case_metrics.items():
            self.logger.log(key, value, self.current_epoch)
        self.logger.log("combined_score", score, self.current_epoch)
        self.logger.log("ema_combined_score", ema, self.current_epoch)

    def case_validation_due(self) -> bool:
        """Case-level validation every ``case_validation_every`` epochs, the first and the last included."""
        return self.current_epoch % self.case_validation_every == 0 or self.current_epoch == self.num_epochs - 1

    def on_epoch_end(self) -> None:
        """nnU-Net's epoch end, with the best checkpoint chosen by the EMA of the combined score."""
        epoch = self.current_epoch
        self.logger.log("epoch_end_timestamps", time(), epoch)
        log = self.logger.get_value
        self.print_to_log_file("train_loss", np.round(log("train_losses", step=-1), 4),
                               "(seg", np.round(log("train_seg_losses", step=-1), 4),
                               "cls", np.round(log("train_cls_losses", step=-1), 4), ")")
        self.print_to_log_file("val_loss", np.round(log("val_losses", step=-1), 4))
        self.print_to_log_file("Pseudo dice", [round(float(i), 4) for i in log("dice_per_class_or_region", step=-1)])
        if not np.isnan(log("combined_score", step=-1)):  # epochs without case-level validation say nothing
            case_numbers = ", ".join(f"{k.removeprefix('val_')} {log(k, step=-1):.4f}" for k in CASE_LEVEL_KEYS)
            self.print_to_log_file(f"case-level: {case_numbers}")
        epoch_seconds = log("epoch_end_timestamps", step=-1) - log("epoch_start_timestamps", step=-1)
        self.print_to_log_file(f"Epoch time: {epoch_seconds:.2f} s")
        if (epoch + 1) % self.save_every == 0 and epoch != self.num_epochs - 1:
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
        ema = log("ema_combined_score", step=-1)
        if not np.isnan(ema) and (self._best_combined is None or ema > self._best_combined):
            self._best_combined = ema
            self._best_ema = log("ema_fg_dice", step=-1)
            self.print_to_log_file(f"New best combined score (EMA): {ema:.4f}")
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_best.pth"))
        if self.local_rank == 0:
            curves = self.write_training_curves()
            if self.progress_plot_due(time()):
                self.plot_progress(curves)
        self.current_epoch += 1

    def progress_plot_due(self, now: float) -> bool:
        """The progress figures at the first and the last epoch, and between them at most every
        ``plot_every_seconds``: nnU-Net's progress.png (a 3000 x 5400 pixel figure) and ours took 1.5-2 s per epoch
        here, a tenth of a demo epoch; the numbers themselves are in training_curves.json every epoch."""
        return (self._last_plot is None or self.current_epoch == self.num_epochs - 1
                or now - self._last_plot >= self.plot_every_seconds)

    def plot_progress(self, curves: dict) -> None:
        """nnU-Net's progress.png and the classification progress PNG."""
        from nnunet_mtl.training.curves import plot_classification_progress

        self.logger.plot_progress_png(self.output_folder)
        plot_classification_progress(curves, Path(self.output_folder) / "progress_classification.png")
        self._last_plot = time()

    def write_training_curves(self) -> dict:
        """Every logged value per epoch as JSON (the report reads it); returns it."""
        from nnunet_mtl.training.curves import not_measured_as_null

        curves = not_measured_as_null(to_plain(self.logger.get_checkpoint()))
        (Path(self.output_folder) / "training_curves.json").write_text(json.dumps(curves))
        return curves

    def run_training(self) -> None:
        """nnU-Net's epoch loop with a progress bar over each epoch's iterations."""
        from tqdm import tqdm

        self.on_train_start()
        for epoch in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs = []
            bar = tqdm(range(self.num_iterations_per_epoch), desc=f"epoch {epoch + 1}/{self.num_epochs}",
                       leave=False, disable=self.local_rank != 0, dynamic_ncols=True)
            for _ in bar:
                train_outputs.append(self.train_step(next(self.dataloader_train)))
                bar.set_postfix(loss=f"{float(train_outputs[-1]['loss']):.3f}")
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
        self.on_train_end()
