"""The NIfTI reader: an intact file reads exactly as SimpleITK (and nnU-Net's reader) read it; a damaged one is an
error that names the file and says what is wrong."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from tiny import REAL_CT

from nnunet_mtl.data.nifti import NiftiError, read_geometry, read_volume

SPACING, ORIGIN, DIRECTION = (0.7, 0.8, 2.5), (10.0, -5.0, 3.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)


def write_sitk(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    image = sitk.GetImageFromArray(array, isVector=False)
    if array.ndim == 3:
        image.SetSpacing(SPACING)
        image.SetOrigin(ORIGIN)
        image.SetDirection(DIRECTION)
    sitk.WriteImage(image, str(path), compress)
    return path


def nifti_bytes(array: np.ndarray, dtype, byte_order: str = "<", slope=np.nan, intercept=np.nan) -> bytes:
    """A single-file NIfTI-1 written field by field (nibabel would rescale on save), any byte order and scaling."""
    dtype = np.dtype(dtype).newbyteorder(byte_order)
    header = nib.Nifti1Header(endianness=byte_order)
    header.set_data_dtype(dtype)
    header.set_data_shape(array.shape)
    header.set_sform(np.array([[-0.7, 0, 0, 10], [0, 0.8, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]]), code=1)
    header["vox_offset"] = 352
    header["scl_slope"], header["scl_inter"] = slope, intercept
    return header.binaryblock + b"\0" * 4 + np.asarray(array, dtype).tobytes(order="F")


def assert_reads_like_itk(path: Path) -> None:
    reference = sitk.ReadImage(str(path))
    volume = read_volume(path)
    expected = sitk.GetArrayFromImage(reference)
    assert volume.array.dtype == expected.dtype, path
    np.testing.assert_array_equal(volume.array, expected)
    assert volume.geometry.spacing == reference.GetSpacing()
    assert volume.geometry.origin == reference.GetOrigin()
    assert volume.geometry.direction == reference.GetDirection()
    assert volume.geometry.pixel_id == reference.GetPixelID()


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
                                   np.float32, np.float64])
def test_intact_files_read_exactly_as_itk_reads_them(tmp_path, dtype):
    """Every data type, both byte orders, with and without scaling (slope 0 / NaN mean none to ITK), gzip or not,
    and uncompressed bytes under a .nii.gz name."""
    rng = np.random.default_rng(0)
    values = rng.integers(0 if np.dtype(dtype).kind == "u" else -100, 100, (5, 4, 3)).astype(dtype)
    if np.dtype(dtype).kind == "f":
        values = values + np.asarray(0.25, dtype)
    for byte_order in "<>":
        for slope, intercept in [(np.nan, np.nan), (1.0, 0.0), (0.3, 1.7), (1.0, -1024.0), (0.0, 5.0)]:
            raw = nifti_bytes(values, dtype, byte_order, slope, intercept)
            for name, data in [("plain.nii", raw), ("packed.nii.gz", gzip.compress(raw)), ("plain.nii.gz", raw)]:
                path = tmp_path / name
                path.write_bytes(data)
                assert_reads_like_itk(path)
                assert read_volume(path).compressed == name.startswith("packed")


def test_real_ct_and_nnunet_input_match_nnunets_own_reader(tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    for path in (REAL_CT / "example_ct.nii.gz", REAL_CT / "example_seg.nii.gz"):
        assert_reads_like_itk(path)
        expected, expected_properties = SimpleITKIO().read_images([str(path)])
        data, properties = read_volume(path).nnunet_input()
        assert data.dtype == expected.dtype and data.shape == expected.shape
        np.testing.assert_array_equal(data, expected)
        assert properties == expected_properties


def test_a_multi_member_gzip_stream_is_read_whole(tmp_path):
    """libdeflate reads the first member only; the reader must notice and read them all (Python's gzip)."""
    raw = nifti_bytes(np.arange(60, dtype=np.int16).reshape(5, 4, 3), np.int16)
    path = tmp_path / "members.nii.gz"
    path.write_bytes(gzip.compress(raw[:300]) + gzip.compress(raw[300:]))
    assert_reads_like_itk(path)


def test_file_bytes_are_kept_on_request(tmp_path):
    path = write_sitk(tmp_path / "a.nii.gz", np.zeros((2, 3, 4), np.int16))
    assert read_volume(path).file_bytes is None
    assert read_volume(path, keep_file_bytes=True).file_bytes == path.read_bytes()


def damaged(kind: str, good: bytes, tmp_path: Path) -> bytes:
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "good.nii.gz")))
    if kind.startswith("cut"):
        return good[: len(good) * int(kind[3:]) // 100]
    if kind == "flipped byte":
        flipped = bytearray(good)
        flipped[len(good) // 2] ^= 0xFF
        return bytes(flipped)
    if kind == "empty":
        return b""
    if kind == "another format":
        return write_sitk(tmp_path / "other.nrrd", array).read_bytes()
    if kind == "an HTML page":
        return b"<!DOCTYPE html><html><body>404 Not Found</body></html>"
    if kind == "uncompressed, cut":
        return gzip.decompress(good)[:-100]
    if kind == "uncompressed, longer":
        return gzip.decompress(good) + b"\0" * 8
    if kind == "compressed twice":
        return gzip.compress(good)
    if kind in ("NaN", "inf"):
        values = array.astype(np.float32)
        values[1, 2, 3] = np.nan if kind == "NaN" else np.inf
        return write_sitk(tmp_path / "float.nii.gz", values).read_bytes()
    if kind in ("2D", "4D"):
        shaped = array[0] if kind == "2D" else np.stack([array, array])
        return write_sitk(tmp_path / "shaped.nii.gz", shaped).read_bytes()
    if kind == "RGB":
        rgb = sitk.Compose(*[sitk.GetImageFromArray(array.astype(np.uint8))] * 3)
        sitk.WriteImage(rgb, str(tmp_path / "rgb.nii.gz"), True)
        return (tmp_path / "rgb.nii.gz").read_bytes()
    if kind == "header of a pair":
        raw = bytearray(gzip.decompress(good))
        raw[344:348] = b"ni1\0"
        return gzip.compress(bytes(raw))
    raise ValueError(kind)


@pytest.mark.parametrize("kind, fragment", [
    ("cut10", "is cut short or damaged"), ("cut50", "is cut short or damaged"), ("cut90", "is cut short or damaged"),
    ("flipped byte", "gzip"), ("empty", "is empty (0 bytes)"),
    ("another format", "is not a NIfTI file (it looks like a NRRD file)"),
    ("an HTML page", "is not a NIfTI file (it looks like an HTML page)"),
    ("uncompressed, cut", "is cut short: its header announces 16 x 12 x 8 voxels of int16"),
    ("uncompressed, longer", "holds 8 bytes beyond the 16 x 12 x 8 voxels of int16"),
    ("compressed twice", "is gzip-compressed twice"),
    ("NaN", "image holds 1 non-finite voxels (NaN)"), ("inf", "image holds 1 non-finite voxels (inf)"),
    ("2D", "image is 2D (size [16, 12]), expected 3D"), ("4D", "image is 4D (size [16, 12, 8, 2]), expected 3D"),
    ("RGB", "image has 3 components per voxel"), ("header of a pair", "is the header of a .hdr/.img pair"),
])
def test_damage_is_an_error_naming_the_file(tmp_path, kind, fragment):
    values = np.random.default_rng(3).integers(-500, 500, (8, 12, 16)).astype(np.int16)
    good = write_sitk(tmp_path / "good.nii.gz", values).read_bytes()
    path = tmp_path / "case_0000.nii.gz"
    path.write_bytes(damaged(kind, good, tmp_path))
    with pytest.raises(NiftiError) as error:
        read_volume(path, "image")
    assert str(error.value).startswith(f"{path}: ") and fragment in error.value.problem, error.value


def test_itk_alone_reads_a_cut_integer_file_as_zeros(tmp_path):
    """Why the reader exists: SimpleITK reads a .nii.gz cut in half without complaint (the lost half is zeros)."""
    values = np.random.default_rng(5).integers(1, 500, (8, 12, 16)).astype(np.int16)  # no zero voxel
    good = write_sitk(tmp_path / "good.nii.gz", values).read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(good[: len(good) // 2])
    silently = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cut.nii.gz")))
    assert silently.shape == values.shape and (silently == 0).any() and (silently == values).any()
    with pytest.raises(NiftiError, match="cut short"):
        read_volume(tmp_path / "cut.nii.gz")


def test_header_only_reading_checks_the_header(tmp_path):
    path = write_sitk(tmp_path / "a.nii.gz", np.zeros((8, 12, 16), np.int16))
    geometry = read_geometry(path)
    reference = sitk.ReadImage(str(path))
    assert geometry.size == (16, 12, 8) and geometry.direction == DIRECTION
    assert geometry.spacing == reference.GetSpacing() and geometry.origin == reference.GetOrigin()
    (tmp_path / "b.nii.gz").write_bytes(b"")
    with pytest.raises(NiftiError, match="is empty"):
        read_geometry(tmp_path / "b.nii.gz")
    write_sitk(tmp_path / "c.nii.gz", np.zeros((12, 16), np.int16))
    with pytest.raises(NiftiError, match="is 2D"):
        read_geometry(tmp_path / "c.nii.gz")
    with pytest.raises(NiftiError, match="cannot be read"):
        read_geometry(tmp_path / "missing.nii.gz")
