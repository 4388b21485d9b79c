"""The subtype of one case once its mask is predicted: the head's logits, the lesion's features, the classifier.

Shared by ``predict`` and the trainer's validation, so the subtype a user gets is computed exactly as the one the
classifier was fitted and calibrated on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nnunet_mtl.model.lesion_features import image_in_hu, lesion_features, select_lesion
from nnunet_mtl.model.subtype_classifier import VARIANTS, SubtypeClassifier, softmax


@dataclass
class CaseSubtype:
    """What the product says of a case's subtype, and what it rests on."""

    probabilities: np.ndarray  # of the chosen variant
    variant: str  # which variant the probabilities are
    variants: dict[str, np.ndarray] = field(default_factory=dict)  # every variant computed
    fold_logits: np.ndarray | None = None  # the head's raw logits per fold (n_folds, n_subtypes)
    features: dict[str, float] | None = None  # of the predicted lesion; None without one
    lesion_voxels: int = 0  # of the lesion the subtype describes (preprocessed grid)
    lesion_ml: float = 0.0

    @property
    def lesion_found(self) -> bool:
        return self.lesion_voxels > 0


def describe_case(fold_logits: np.ndarray, data: np.ndarray, labels: np.ndarray, spacing_zyx, plans_manager,
                  configuration_manager, classifier: SubtypeClassifier | None, variant: str | None = None,
                  with_features: bool | None = None, lesion_label: int = 2) -> CaseSubtype:
    """The case's subtype from the head's per-fold logits and the lesion predicted in ``labels``.

    ``data`` is nnU-Net's preprocessed image (channels first) and ``labels`` the predicted label map on that grid.
    ``variant`` None: the classifier's default (the head alone without a classifier). Features are computed when the
    classifier uses them, or when ``with_features`` asks (fitting the classifier needs them before it exists).
    """
    lesion = select_lesion(labels, lesion_label)
    voxels = int(lesion.sum()) if lesion is not None else 0
    spacing = [float(s) for s in spacing_zyx]
    result = CaseSubtype(np.zeros(0), "cnn", fold_logits=np.asarray(fold_logits, float), lesion_voxels=voxels,
                         lesion_ml=voxels * float(np.prod(spacing)) / 1000.0)
    needs = with_features if with_features is not None else bool(classifier and classifier.feature_model)
    if needs and lesion is not None:
        channel = 0
        scheme = configuration_manager.normalization_schemes[channel]
        properties = plans_manager.foreground_intensity_properties_per_channel.get(str(channel))
        result.features = lesion_features(image_in_hu(np.asarray(data[channel]), scheme, properties),
                                          np.asarray(labels), spacing, lesion_label)
    if classifier is None:
        result.variants = {"cnn": softmax(result.fold_logits.mean(0))}
        chosen = "cnn"
    else:
        result.variants = classifier.probabilities(list(result.fold_logits), result.features)
        chosen = variant or classifier.default_variant
    if chosen not in VARIANTS:
        raise ValueError(f"unknown classifier variant {chosen!r}; choose one of {VARIANTS}")
    if chosen not in result.variants:  # 'features' without a lesion: the head is all there is
        chosen = "cnn"
    result.variant, result.probabilities = chosen, result.variants[chosen]
    return result
