"""The Python API (nnunet_mtl.api): a file, a SimpleITK image and a nibabel image give what `nnunet-mtl predict`
writes for the same case."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from volumes import crop_phantom_test_images, read_array

from nnunet_mtl.api import Model, predict
from nnunet_mtl.inference.outputs import read_probability_table
from nnunet_mtl.inference.predict import InputError, PredictionMode, predict_folder


@pytest.fixture(scope="module")
def one_case(tiny_model, tiny_dataset, tmp_path_factory):
    """The first phantom test case (cropped around its gland) and the CLI path's prediction of it (fast mode, as the
    API's default)."""
    images = tmp_path_factory.mktemp("api_images")
    crops = tmp_path_factory.mktemp("api_crops")
    source = crops / f"{crop_phantom_test_images(tiny_dataset, crops)[0]}_0000.nii.gz"  # cropped: a few tiles
    shutil.copy(source, images / source.name)
    out = tmp_path_factory.mktemp("api_cli")
    predict_folder(tiny_model, images, out, device=torch.device("cpu"), mode=PredictionMode.fast(), progress=False)
    case = source.name[: -len("_0000.nii.gz")]
    return {"image": images / source.name, "mask": read_array(out / f"{case}.nii.gz"),
            "probabilities": read_probability_table(out)[case]}


def test_predict_a_file_and_image_objects_as_the_cli_does(tiny_model, one_case):
    model = Model(tiny_model, device="cpu")
    from_file = model.predict(one_case["image"])
    image = sitk.ReadImage(str(one_case["image"]))
    from_sitk = model.predict(image)
    from_nibabel = model.predict(nib.load(str(one_case["image"])))
    for result in (from_file, from_sitk, from_nibabel):
        assert np.array_equal(result.mask_array, one_case["mask"])
        assert result.probabilities == pytest.approx(one_case["probabilities"], abs=1e-6)
        assert result.subtype == int(np.argmax(one_case["probabilities"]))
        assert result.mask.GetSize() == image.GetSize()
        assert result.mask.GetSpacing() == pytest.approx(image.GetSpacing())
        assert result.mask.GetOrigin() == pytest.approx(image.GetOrigin())
        assert result.mask.GetPixelID() == sitk.sitkUInt8
        assert result.lesion_found == bool((result.mask_array == 2).any())
    # the one-call form loads the model itself
    assert np.array_equal(predict(one_case["image"], tiny_model, device="cpu").mask_array, one_case["mask"])


def test_bad_inputs_are_refused_with_a_reason(tiny_model, tmp_path):
    model = Model(tiny_model, device="cpu")
    with pytest.raises(InputError, match="no such file"):
        model.predict(tmp_path / "missing_0000.nii.gz")
    with pytest.raises(InputError, match="2D"):
        model.predict(sitk.Image(8, 8, sitk.sitkInt16))
    with pytest.raises(InputError, match="cannot predict a ndarray"):
        model.predict(np.zeros((4, 4, 4)))
