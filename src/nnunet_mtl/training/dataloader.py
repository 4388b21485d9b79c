"""nnU-Net's data loader plus the case subtype in every batch, and lesion-centred patches on request.

Overrides of :class:`nnunetv2.training.dataloading.data_loader.nnUNetDataLoader`:

- ``generate_train_batch``: adds ``batch['subtype']`` looked up by the batch's case keys (nnU-Net puts them in
  ``batch['keys']``), so the subtype can never be paired with the wrong patch.
- ``get_bbox``: when a sample is forced to contain foreground and ``lesion_centred`` is on, centre it on a lesion
  voxel rather than on any foreground class, so the classification target is in view; a random patch of a large
  crop may miss a small lesion and teach the head noise.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


def class_balanced_probabilities(identifiers: list[str], case_subtypes: Mapping[str, int]) -> np.ndarray:
    """Per-case sampling probabilities that give every subtype the same share of samples."""
    labels = np.array([case_subtypes[k] for k in identifiers])
    counts = {c: int((labels == c).sum()) for c in np.unique(labels)}
    weights = np.array([1.0 / counts[c] for c in labels])
    return weights / weights.sum()


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

    def get_bbox(self, data_shape, force_fg, class_locations, overwrite_class=None, verbose=False):
        if force_fg and self.lesion_centred and overwrite_class is None:
            overwrite_class = self.lesion_label  # nnU-Net falls back to any foreground when the case has none
        return super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)

    def generate_train_batch(self) -> dict:
        batch = super().generate_train_batch()
        batch["subtype"] = torch.tensor([self.case_subtypes[k] for k in batch["keys"]], dtype=torch.long)
        return batch
