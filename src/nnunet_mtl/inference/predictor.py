"""nnU-Net's predictor, taught to collect the subtype logits of every tile from the same forward pass.

Overrides of :class:`nnunetv2.inference.predict_from_raw_data.nnUNetPredictor` (and why):

- ``_internal_maybe_mirror_and_predict``: the network returns ``(segmentation, subtype_logits)``; we keep the
  segmentation for nnU-Net's Gaussian-weighted sliding window and record the subtype logits with the tile's
  predicted lesion volume, so one encoder pass per tile (and per mirror) serves both heads.
- ``predict_logits_from_preprocessed_data``: resets the tile record before nnU-Net loops over folds and tiles, and
  aggregates it afterwards into the case's subtype probabilities; one fold already loaded is not loaded again.
- ``predict_sliding_window_return_logits``: fast mode on CPU predicts a crop of up to ``single_pass_max_patches``
  patch volumes in a single pass, padded only to the network's stride. The network is fully convolutional; measured on
  the phantom test set, a single pass over the whole crop gave the same whole-pancreas Dice as tiling at step 1.0
  (0.827 vs 0.829), a better lesion Dice (0.446 vs 0.399: no tile borders) in a quarter of the time. With the
  default ``lesion_tile`` aggregation, in every mode, the subtype then comes from one extra patch-sized forward pass
  centred on the predicted lesion in the gland, the field of view the head learned on: by default the encoder and
  the head alone (``MultiTaskUNet.classify``), attending to the lesion probability of the pass already made.

The network's forward passes go through an engine (:mod:`nnunet_mtl.inference.engines`: torch, OpenVINO, ONNX
Runtime; fp32 or bf16), bound to each fold's weights before nnU-Net's sliding window runs.

Everything else (preprocessing, Gaussian weighting, resampling back to the original geometry) is nnU-Net's.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.helpers import dummy_context

from nnunet_mtl.inference.engines import Engine, TorchEngine, weights_key
from nnunet_mtl.inference.labels import labels_from_scores
from nnunet_mtl.model.lesion_features import select_lesion
from nnunet_mtl.model.subtype_classifier import SubtypeClassifier

AGGREGATIONS = ("lesion_tile", "lesion_weighted", "mean")
LESION_TILE_ATTENTION = ("crop", "tile")


def lesion_centre(labels: np.ndarray, lesion_label: int) -> np.ndarray | None:
    """Voxel centre of the lesion to classify (:func:`~nnunet_mtl.model.lesion_features.select_lesion`: the largest
    lesion component inside the largest foreground component); None without a predicted lesion."""
    lesion = select_lesion(labels, lesion_label)
    return None if lesion is None else mask_centre(lesion)


def mask_centre(mask: np.ndarray) -> np.ndarray:
    """Rounded voxel centre of a non-empty mask."""
    return np.round(np.mean(np.nonzero(mask), axis=1)).astype(int)


def lesion_tile_region(centre: np.ndarray, patch, shape) -> tuple[slice, ...]:
    """The spatial slices of the patch-sized tile centred on ``centre``, shifted inside a crop of ``shape`` (a crop
    thinner than the patch starts at 0 and is padded by the caller)."""
    patch, shape = np.array(patch), np.array(shape)
    start = np.clip(centre - patch // 2, 0, np.maximum(shape - patch, 0))
    return tuple(slice(int(a), int(a + p)) for a, p in zip(start, patch))


@dataclass
class TileRecord:
    logits: torch.Tensor  # (num_subtypes,) mean over mirror passes
    lesion_voxels: float  # voxels of the tile predicted lesion
    fold: int = 0  # which parameter set (fold) of an ensemble predicted it


def fold_subtype_logits(records: list[TileRecord], method: str = "lesion_weighted") -> np.ndarray:
    """Case-level subtype logits per fold (n_folds, n_subtypes) from per-tile logits.

    Per fold, ``mean`` averages logits over the tiles; ``lesion_weighted`` weights each tile by its predicted lesion
    volume so tiles that show the lesion decide, falling back to the plain mean when no tile shows any lesion.
    ``lesion_tile`` weights the same way; its record is the one patch centred on the lesion (see
    :meth:`MultiTaskPredictor._classify_on_lesion_tile`), or the tiles where no lesion was predicted.
    """
    if not records:
        raise ValueError("no tiles were predicted")
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; choose one of {AGGREGATIONS}")
    per_fold = []
    for fold in sorted({r.fold for r in records}):
        fold_records = [r for r in records if r.fold == fold]
        logits = torch.stack([r.logits.float() for r in fold_records])
        weights = torch.ones(len(fold_records))
        if method != "mean":
            lesion = torch.tensor([r.lesion_voxels for r in fold_records], dtype=torch.float32)
            if lesion.sum() >= 1.0:  # at least one voxel of lesion somewhere
                weights = lesion
        per_fold.append((logits * weights[:, None]).sum(0) / weights.sum())
    return torch.stack(per_fold).numpy()


def aggregate_subtype_logits(records: list[TileRecord], method: str = "lesion_weighted") -> np.ndarray:
    """Case-level subtype probabilities of the network's head: the softmax of the folds' mean logits (folds count
    equally, as in nnU-Net's ensemble of the segmentation logits). The calibrated, fused subtype of a trained model
    is :class:`~nnunet_mtl.model.subtype_classifier.SubtypeClassifier`'s."""
    return torch.softmax(torch.from_numpy(fold_subtype_logits(records, method)).mean(0), dim=0).numpy()


class MultiTaskPredictor(nnUNetPredictor):
    """Sliding-window prediction of masks and one subtype per case."""

    def __init__(self, *args, aggregation: str = "lesion_tile", single_pass_max_patches: float = 0.0,
                 lesion_label: int = 2, channels_last: bool = False, engine: Engine | None = None,
                 lesion_tile_attention: str = "crop", lesion_tile_mirroring: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
        if lesion_tile_attention not in LESION_TILE_ATTENTION:
            raise ValueError(f"unknown lesion tile attention {lesion_tile_attention!r}; "
                             f"choose one of {LESION_TILE_ATTENTION}")
        self.engine = engine if engine is not None else TorchEngine()
        self.lesion_tile_attention = lesion_tile_attention
        # The lesion tile's subtype pass is mirrored only on request: see _classify_on_lesion_tile.
        self.lesion_tile_mirroring = lesion_tile_mirroring
        self._weights_keys: dict[int, str] = {}
        self._loaded_parameters: dict | None = None  # the parameter set nnU-Net's fold loop last loaded
        self._labelled: tuple[weakref.ref, np.ndarray] | None = None  # (logits, their label map): see crop_labels
        self.aggregation = aggregation
        self.single_pass_max_patches = single_pass_max_patches
        self.lesion_label = lesion_label
        self.channels_last = channels_last
        self.tile_records: list[TileRecord] = []
        self.fold_index = 0  # parameter set being predicted: nnU-Net calls the sliding window once per fold
        self.last_subtype_probabilities: np.ndarray | None = None
        self.last_fold_logits: np.ndarray | None = None  # (n_folds, n_subtypes): the head's logits of each fold
        # The model folder's fitted subtype classifier (calibration, feature model, fusion) and the variant asked for
        # (None: the classifier's default); set by ``inference.predict.load_predictor``.
        self.subtype_classifier: SubtypeClassifier | None = None
        self.classifier_variant: str | None = None

    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor, mirror: bool | None = None) -> torch.Tensor:
        """Replaces nnU-Net's version: same mirroring, but records the subtype logits of the tile too.
        ``mirror`` None: as nnU-Net (``use_mirroring``); the lesion tile passes its own setting."""
        if self.channels_last and x.ndim == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        segmentation, subtype_logits = self._forward(x)
        n_passes = 1
        for combination in self._flips(self.use_mirroring if mirror is None else mirror):
            seg_flipped, logits_flipped = self._forward(torch.flip(x, combination))
            segmentation += torch.flip(seg_flipped, combination)
            if subtype_logits is not None:
                subtype_logits += logits_flipped
            n_passes += 1
        if n_passes > 1:
            segmentation /= n_passes
        if subtype_logits is not None:
            self._record_tile(segmentation, subtype_logits / n_passes)
        return segmentation

    def _flips(self, mirror: bool) -> list[tuple[int, ...]]:
        """The tensor dimensions each mirrored pass flips (nnU-Net's combinations of the allowed axes); none
        without mirroring."""
        if not mirror or self.allowed_mirroring_axes is None:
            return []
        axes = [m + 2 for m in self.allowed_mirroring_axes]
        return [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(segmentation, subtype logits) from the engine; logits are None when the head is switched off."""
        return self.engine.forward(x)

    def _bind_engine(self) -> None:
        """Hand the engine the network with this fold's weights (nnU-Net has just loaded them into it).

        Exported engines find their export by a hash of the weights: each fold's parameters are hashed once; the
        trainer's validation (no parameter list, weights that change every epoch) hashes the network as it is."""
        weights = None
        if self.engine.exported:
            parameters = self.list_of_parameters
            if parameters and self.fold_index < len(parameters):
                if self.fold_index not in self._weights_keys:
                    self._weights_keys[self.fold_index] = weights_key(parameters[self.fold_index])
                weights = self._weights_keys[self.fold_index]
            else:
                weights = weights_key(self.network.state_dict())
        self.engine.bind(self.network, weights)

    def crop_labels(self, logits: torch.Tensor) -> np.ndarray:
        """The label map of a crop's logits, computed once per logits tensor: the lesion tile, then the case's
        lesion features (predict, validation) ask for the same map. Held by a weak reference, so the logits are not
        kept alive after the case."""
        if self._labelled is None or self._labelled[0]() is not logits:
            self._labelled = (weakref.ref(logits), labels_from_scores(logits).cpu().numpy())
        return self._labelled[1]

    def _record_tile(self, segmentation: torch.Tensor, subtype_logits: torch.Tensor) -> None:
        lesion = 0.0
        if self.aggregation != "mean" and self.lesion_label < segmentation.shape[1]:
            lesion = float((labels_from_scores(segmentation, dim=1) == self.lesion_label).sum())
        for logits in subtype_logits.float().cpu():  # batch of one tile in practice
            self.tile_records.append(TileRecord(logits, lesion, self.fold_index))

    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's fold loop, bracketed by resetting and aggregating the subtype record of this case.

        With one parameter set whose weights the network already holds, nnU-Net's loop would copy them into the
        network again for every case (0.15 s per case for the demo network); the one pass is run directly then, with
        nnU-Net's thread setting."""
        self.tile_records, self.fold_index = [], 0
        parameters = self.list_of_parameters
        if len(parameters) == 1 and self._loaded_parameters is parameters[0]:
            threads = torch.get_num_threads()
            torch.set_num_threads(min(default_num_processes, threads))
            try:
                logits = self.predict_sliding_window_return_logits(data).to("cpu")
            finally:
                torch.set_num_threads(threads)
        else:
            logits = super().predict_logits_from_preprocessed_data(data)
            self._loaded_parameters = parameters[-1] if parameters else None
            if len(parameters) > 1:  # nnU-Net sums the folds into the first fold's tensor: its label map is stale
                self._labelled = None
        self._summarise_records()
        return logits

    def _summarise_records(self) -> None:
        if self.tile_records:
            self.last_fold_logits = fold_subtype_logits(self.tile_records, self.aggregation)
            self.last_subtype_probabilities = aggregate_subtype_logits(self.tile_records, self.aggregation)
        else:
            self.last_fold_logits = self.last_subtype_probabilities = None

    @torch.inference_mode()
    def predict_with_current_weights(self, data: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """One case with the network as it is (no fold loop): used by the trainer's case-level validation."""
        self.tile_records, self.fold_index = [], 0
        logits = self.predict_sliding_window_return_logits(data)
        self._summarise_records()
        return logits, self.last_subtype_probabilities

    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
        """nnU-Net's sliding window (or our single pass) for one fold, then the subtype of the lesion.

        The lesion-centred patch decides with ``lesion_tile``, and after a single pass whatever the aggregation:
        over a whole crop the head drifts (see :meth:`_classify_on_lesion_tile`)."""
        first_record = len(self.tile_records)
        self._bind_engine()
        patch_voxels = float(np.prod(self.configuration_manager.patch_size))
        too_big = np.prod(input_image.shape[1:]) > self.single_pass_max_patches * patch_voxels
        # On CUDA every new crop shape makes cuDNN tune its kernels again (measured on an H200: fast mode with a
        # single pass per crop took 4.06 s per case against 3.73 for tiling); tiles keep one shape.
        single_pass = not (too_big or self.device.type == "cuda")
        if single_pass:
            logits = self._predict_single_pass(input_image)
        else:
            logits = super().predict_sliding_window_return_logits(input_image)
        if (self.aggregation == "lesion_tile" or single_pass) and len(self.tile_records) > first_record \
                and self.lesion_label < logits.shape[0]:
            self._classify_on_lesion_tile(input_image, logits, first_record)
        self.fold_index += 1
        return logits

    def _predict_single_pass(self, image: torch.Tensor) -> torch.Tensor:
        """The whole crop in one forward pass, zero-padded (nnU-Net's padder) only up to a multiple of the stride."""
        self.network = self.network.to(self.device)
        self.network.eval()
        stride = np.prod(np.array(self.configuration_manager.pool_op_kernel_sizes), axis=0)
        padded, revert = pad_nd_image(image, shape_must_be_divisible_by=[int(s) for s in stride],
                                      return_slicer=True)
        with self._autocast():
            logits = self._internal_maybe_mirror_and_predict(padded[None].to(self.device))[0]
        return logits[(slice(None), *revert[1:])].float().to("cpu")

    def _autocast(self):
        return torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _classify_on_lesion_tile(self, image: torch.Tensor, logits: torch.Tensor, first_record: int) -> None:
        """Replace this pass's subtype records with those of one patch centred on the lesion in the gland.

        The head learned on patch-sized, lesion-centred tiles. Over a whole crop the encoder's instance
        normalisation sees another field of view and the head drifts (measured on the demo's test set: macro-F1
        0.37 from the single pass, 0.64 from tiles at step 0.5 over the same model); tiles weighted by their
        predicted lesion volume let false lesions away from the gland vote. One extra patch-sized pass, on the
        lesion :func:`lesion_centre` picks; without a predicted lesion the tiles' own records stand.

        ``lesion_tile_attention="crop"`` (default): the encoder and head alone run on the patch, attending to the
        lesion probability of the pass already made over the crop, cropped to the patch; ``"tile"``: the whole
        network runs on the patch and its own decoder gives the attention (twice the work).

        The patch is not mirrored unless ``lesion_tile_mirroring``: with nnU-Net's 8 mirrors, the patch's 8 encoder
        passes cost as much as a whole crop of one tile and made default mode slower than stock nnU-Net at full
        size (docs/measurements-real-scale.md); trainer validation uses the same setting, so the head's calibration
        is fitted on the logits prediction gives.
        """
        centre = lesion_centre(self.crop_labels(logits), self.lesion_label)
        if centre is None:
            return
        patch = np.array(self.configuration_manager.patch_size)
        region = (slice(None), *lesion_tile_region(centre, patch, image.shape[1:]))
        tile = pad_nd_image(image[region], [int(p) for p in patch])[None].to(self.device)  # crops thinner than it
        del self.tile_records[first_record:]
        if self.lesion_tile_attention == "tile":
            with self._autocast():
                self._internal_maybe_mirror_and_predict(tile, mirror=self.use_mirroring and self.lesion_tile_mirroring)
            return
        tile_logits = logits[region].float()
        lesion_voxels = float((labels_from_scores(tile_logits) == self.lesion_label).sum())
        # the head's attention as the network makes it from its own decoder (MultiTaskUNet.forward)
        attention = self.network.attention_from_probabilities(torch.softmax(tile_logits, 0)[None])[0]
        probability = pad_nd_image(attention, [int(p) for p in patch])[None]
        with self._autocast():
            subtype_logits = self._classify_mirrored(tile, probability.to(self.device))
        for row in subtype_logits.float().cpu():
            self.tile_records.append(TileRecord(row, lesion_voxels, self.fold_index))

    def _classify_mirrored(self, tile: torch.Tensor, probability: torch.Tensor) -> torch.Tensor:
        """The engine's encoder-and-head pass; with ``lesion_tile_mirroring``, averaged over the segmentation's
        mirrors."""
        logits = self.engine.classify(tile, probability)
        flips = self._flips(self.use_mirroring and self.lesion_tile_mirroring)
        for combination in flips:
            logits = logits + self.engine.classify(torch.flip(tile, combination), torch.flip(probability, combination))
        return logits / (len(flips) + 1) if flips else logits
