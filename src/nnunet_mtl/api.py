"""Python API: predict one CT (a file, a SimpleITK image or a nibabel image) with a trained model.

    from nnunet_mtl.api import Model, predict

    model_dir = "work/nnUNet_results/Dataset501_Pancreas/nnUNetTrainerMTL__nnUNetPlans_MTL__3d_fullres"
    result = predict("ct_0000.nii.gz", model_dir)
    result.mask                      # SimpleITK image, uint8 labels 0/1/2, the input's size, spacing, origin, direction
    result.subtype, result.probabilities, result.lesion_found, result.lesion_volume_ml

    model = Model(model_dir, fast=True)   # load once, predict many
    for image in images:
        model.predict(image)

The same code path as ``nnunet-mtl predict`` (the model's postprocessing, lesion filters and subtype classifier
included); the image goes through the same verified reader, from a temporary file when an image object is given.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from nnunet_mtl.inference import engines
from nnunet_mtl.inference.lesion_candidates import Candidate, lesion_facts
from nnunet_mtl.inference.lesion_filters import read_lesion_filters
from nnunet_mtl.inference.outputs import MASK_ENDING
from nnunet_mtl.inference.postprocessing import read_decision
from nnunet_mtl.inference.predict import IMAGE_SUFFIX, InputError, PredictionMode, load_predictor, predict_case

ImageLike = str | Path | sitk.Image | Any  # Any: a nibabel SpatialImage (nibabel is imported only when one is given)


@dataclass
class CasePrediction:
    """One case's result: the mask in the input's geometry and the subtype with what it rests on."""

    mask: sitk.Image
    subtype: int | None  # None when the model was loaded with classify=False
    probabilities: np.ndarray | None  # calibrated, of the classifier variant in use
    variant: str | None
    lesion_found: bool
    lesion_volume_ml: float
    lesion_components: list[Candidate] = field(default_factory=list)  # every lesion component, scored

    @property
    def mask_array(self) -> np.ndarray:
        """The mask as a (z, y, x) numpy array."""
        return sitk.GetArrayFromImage(self.mask)


class Model:
    """A trained model loaded once for many predictions (``nnunet-mtl predict``'s options as keywords)."""

    def __init__(self, model_dir: str | Path, *, fast: bool = True, device: str = "auto",
                 folds: list[str] | None = None, checkpoint: str | None = None, classifier: str | None = None,
                 engine: str = "torch", precision: str = "fp32", classify: bool = True) -> None:
        from nnunet_mtl.training.run import resolve_device

        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        options = {"classify": classify, "classifier": classifier, "engine": engine, "precision": precision}
        self.mode = PredictionMode.fast(**options) if fast else PredictionMode(**options)
        engines.check_engine(engine, precision, self.device)
        self.predictor = load_predictor(self.model_dir, folds, checkpoint, self.device, self.mode)
        self.keep_largest = read_decision(self.model_dir)
        self.filters = read_lesion_filters(self.model_dir)

    def predict(self, image: ImageLike) -> CasePrediction:
        """Mask and subtype of one CT: a NIfTI path, a SimpleITK image or a nibabel image (3D, HU)."""
        with tempfile.TemporaryDirectory(prefix="nnunet-mtl-") as tmp:
            folder = Path(tmp)
            image_file = _as_file(image, folder)
            subtype, candidates = predict_case(self.predictor, image_file, folder, "case", self.keep_largest,
                                               self.filters)
            mask = sitk.ReadImage(str(folder / f"case{MASK_ENDING}"))
        facts = lesion_facts(candidates)
        probabilities = None if subtype is None else np.asarray(subtype.probabilities, dtype=float)
        return CasePrediction(mask=mask, subtype=None if probabilities is None else int(np.argmax(probabilities)),
                              probabilities=probabilities, variant=None if subtype is None else subtype.variant,
                              lesion_found=bool(facts["lesion_found"]),
                              lesion_volume_ml=float(facts["lesion_volume_ml"]), lesion_components=candidates)


def predict(image: ImageLike, model_dir: str | Path, **options) -> CasePrediction:
    """Load ``model_dir`` and predict one image (see :class:`Model` for the options); for many images build a
    :class:`Model` once."""
    return Model(model_dir, **options).predict(image)


def _as_file(image: ImageLike, folder: Path) -> Path:
    """A NIfTI file of the image: the path itself, or the image object written into ``folder``."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        return path
    target = folder / f"input{IMAGE_SUFFIX}"
    if isinstance(image, sitk.Image):
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"the image is {image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} "
                             "components per voxel; a 3D single-channel CT is expected")
        sitk.WriteImage(image, str(target), True)
        return target
    if hasattr(image, "affine") and hasattr(image, "dataobj"):  # nibabel's SpatialImage, without importing it first
        import nibabel as nib

        nib.save(image, str(target))
        return target
    raise InputError(f"cannot predict a {type(image).__name__}: give a NIfTI path, a SimpleITK image or a nibabel "
                     "image")
