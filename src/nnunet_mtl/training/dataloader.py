"""nnU-Net's data loader plus the case subtype in every batch, lesion-centred patches and case sampling weights.

Overrides of :class:`nnunetv2.training.dataloading.data_loader.nnUNetDataLoader`:

- ``generate_train_batch``: adds ``batch['subtype']`` looked up by the batch's case keys (nnU-Net puts them in
  ``batch['keys']``), so the subtype can never be paired with the wrong patch, and ``batch['subtype_counts']`` (0
  for a patch whose lesion contrast the augmentation moved, see ``augmentation.MovedLesionLog``; else 1); in a
  worker process, first makes the worker die with the training process (below).
- ``get_bbox``: when a sample is forced to contain foreground and ``lesion_centred`` is on, centre it on a lesion
  voxel rather than on any foreground class, so the classification target is in view; a random patch of a large
  crop may miss a small lesion and teach the head noise.

Data-augmentation workers (batchgenerators processes that call ``generate_train_batch``) die with the training
process: on its first batch a worker asks the kernel to kill it when its parent dies (``prctl(PR_SET_PDEATHSIG)``,
Linux). Without it, ``kill -9`` of ``train`` left the workers running, blocked on a full queue, until ended by hand.
Where prctl is missing, a worker still exits at its next batch once its parent has changed.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_mtl.training.augmentation import MovedLesionLog


def class_balanced_probabilities(identifiers: list[str], case_subtypes: Mapping[str, int]) -> np.ndarray:
    """Per-case sampling probabilities that give every subtype the same share of samples."""
    labels = np.array([case_subtypes[k] for k in identifiers])
    counts = {c: int((labels == c).sum()) for c in np.unique(labels)}
    weights = np.array([1.0 / counts[c] for c in labels])
    return weights / weights.sum()


SMALL_LESION_ML = 1.0  # lesions under this are "small": found far less often than larger ones (issue 17)


def small_lesion_weights(lesion_ml: Sequence[float], factor: float,
                         reference_ml: float = SMALL_LESION_ML) -> np.ndarray:
    """Per-case sampling weights that draw cases with a small lesion more often.

    A lesion of ``v`` ml under ``reference_ml`` is drawn ``min(factor, reference_ml / v)`` times as often as a case
    with a larger lesion (or none): a 0.5 ml lesion twice, a 0.1 ml one ``min(factor, 10)`` times. Why: small lesions
    are rare among training cases (10 % of the phantom's) and cover a few dozen voxels of the patches that show them,
    and they are the lesions a detector misses (issue 17). Weights, not probabilities: multiply, then normalise."""
    if factor < 1:
        raise ValueError(f"small-lesion oversampling factor must be >= 1, got {factor}")
    volumes = np.asarray(lesion_ml, dtype=np.float64)
    if volumes.ndim != 1 or (volumes < 0).any() or not np.isfinite(volumes).all():
        raise ValueError(f"lesion volumes must be finite and >= 0, got {volumes}")
    weights = np.ones_like(volumes)
    small = (volumes > 0) & (volumes < reference_ml)
    weights[small] = np.minimum(factor, reference_ml / volumes[small])
    return weights


def case_sampling_probabilities(identifiers: list[str], case_subtypes: Mapping[str, int], class_balanced: bool,
                                lesion_ml: Sequence[float] | None = None,
                                small_lesion_factor: float = 1.0) -> np.ndarray | None:
    """Per-case draw probabilities for nnU-Net's loader (``sampling_probabilities``), None for its uniform draw.

    Class balance and small-lesion oversampling multiply: a small lesion of a rare subtype gains both."""
    weights = np.ones(len(identifiers))
    if class_balanced:
        weights *= class_balanced_probabilities(identifiers, case_subtypes)
    if small_lesion_factor != 1.0:
        if lesion_ml is None or len(lesion_ml) != len(identifiers):
            raise ValueError("small-lesion oversampling needs one lesion volume per training case")
        weights *= small_lesion_weights(lesion_ml, small_lesion_factor)
    if not class_balanced and small_lesion_factor == 1.0:
        return None
    return weights / weights.sum()


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when the thread that created it ends; False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


class MultiTaskDataLoader(nnUNetDataLoader):
    def __init__(self, *args, case_subtypes: Mapping[str, int], lesion_label: int | None = 2,
                 lesion_centred: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        missing = [k for k in self.indices if k not in case_subtypes]
        if missing:
            raise KeyError(f"no subtype for cases {missing[:5]} (dataset.json 'case_subtypes')")
        self.case_subtypes = dict(case_subtypes)
        self.lesion_label = lesion_label
        self.lesion_centred = lesion_centred and lesion_label is not None
        self._creator_pid = os.getpid()
        self._guarded_pid: int | None = None  # the worker process that has asked to die with its parent
        self._worker_parent: int | None = None

    def _guard_worker(self) -> None:
        """In a worker process: die with the parent (first batch), or exit once the parent is gone (fallback)."""
        pid = os.getpid()
        if pid == self._creator_pid:
            return  # the training process itself (nnUNet_n_proc_DA=0): nothing to guard
        if self._guarded_pid != pid:
            self._guarded_pid, self._worker_parent = pid, os.getppid()
            die_with_parent()
            forked = multiprocessing.get_start_method() == "fork"  # batchgenerators uses the default context
            if forked and self._worker_parent != self._creator_pid:  # the trainer died before prctl took effect
                os._exit(0)
        elif os.getppid() != self._worker_parent:
            os._exit(0)

    def get_bbox(self, data_shape, force_fg, class_locations, overwrite_class=None, verbose=False):
        if force_fg and self.lesion_centred and overwrite_class is None:
            overwrite_class = self.lesion_label  # nnU-Net falls back to any foreground when the case has none
        return super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)

    def generate_train_batch(self) -> dict:
        self._guard_worker()
        log = self.transforms if isinstance(self.transforms, MovedLesionLog) else None
        if log is not None:
            log.moved.clear()
        batch = super().generate_train_batch()
        batch["subtype"] = torch.tensor([self.case_subtypes[k] for k in batch["keys"]], dtype=torch.long)
        moved = log.moved if log is not None and len(log.moved) == len(batch["keys"]) else [False] * len(batch["keys"])
        batch["subtype_counts"] = torch.tensor([0.0 if m else 1.0 for m in moved])
        return batch
