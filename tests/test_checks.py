"""Per-file checks of images and masks (data/checks.py) on hand-made headers and arrays: each problem named, each
tolerance held at its edge from both sides. The reader's own checks (whole file, 3D, finite) are in test_nifti.py."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from nnunet_mtl.data import checks
from nnunet_mtl.data.checks import clean_mask, geometry_problems
from nnunet_mtl.data.nifti import Geometry

SPACING, ORIGIN = (0.8, 0.8, 2.0), (10.0, -20.0, 30.0)


def image(array=None, spacing=SPACING, origin=ORIGIN, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Geometry:
    """The header view the reader gives (x, y, z order), of an array in z, y, x order."""
    shape = (4, 6, 8) if array is None else np.shape(array)
    return Geometry(size=tuple(reversed(shape)), spacing=tuple(float(v) for v in spacing),
                    origin=tuple(float(v) for v in origin), direction=tuple(float(d) for d in direction),
                    pixel_id=sitk.sitkInt16)


def test_geometry_tolerances_hold_at_their_edges() -> None:
    reference = image()
    assert geometry_problems(reference, image()) == []
    # spacing: relative 1e-4
    assert geometry_problems(reference, image(spacing=(0.80006, 0.8, 2.0))) == []
    assert geometry_problems(reference, image(spacing=(0.8002, 0.8, 2.0))) == [
        "spacing [0.8002, 0.8, 2] differs from the image's [0.8, 0.8, 2]"]
    assert geometry_problems(reference, image(spacing=(0.8, 0.8, 2.5))) != []
    # origin: absolute 1e-3 mm
    assert geometry_problems(reference, image(origin=(10.0009, -20.0, 30.0))) == []
    assert geometry_problems(reference, image(origin=(10.0, -20.0, 30.0011))) == [
        "origin [10, -20, 30.0011] differs from the image's [10, -20, 30]"]
    assert geometry_problems(reference, image(origin=(10.5, -20.0, 30.0))) != []
    # direction: absolute 1e-4
    near = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
    near[0, 1] = 5e-5
    assert geometry_problems(reference, image(direction=near.ravel())) == []
    flipped = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    assert geometry_problems(reference, image(direction=flipped)) == [
        "direction [-1, 0, 0, 0, -1, 0, 0, 0, 1] differs from the image's [1, 0, 0, 0, 1, 0, 0, 0, 1]"]
    # a rotated image: entries near 0.7 must still match to 1e-4 (absolute), not relative to their size
    turned = image(direction=rotation_z(45.0))
    assert geometry_problems(turned, image(direction=rotation_z(45.0))) == []
    assert len(geometry_problems(turned, image(direction=rotation_z(45.5)))) == 1
    assert geometry_problems(reference, image(np.zeros((4, 6, 9), np.int16))) == [
        "size [9, 6, 4] differs from the image's [8, 6, 4]"]
    everything = geometry_problems(reference, image(np.zeros((5, 6, 8), np.int16), (1, 1, 1), (0, 0, 0), flipped))
    assert [p.split(" ")[0] for p in everything] == ["size", "spacing", "origin", "direction"]


def rotation_z(degrees: float) -> tuple[float, ...]:
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def mask(values: dict[tuple[int, int, int], float], dtype=np.float32) -> np.ndarray:
    array = np.zeros((4, 6, 8), dtype)
    array[1:3, 1:4, 1:5] = 1
    for index, value in values.items():
        array[index] = value
    return array


def test_clean_mask_rounds_within_the_tolerance_only() -> None:
    quirk = clean_mask(mask({(1, 1, 1): 1.0000152587890625, (2, 2, 2): 2.0009, (0, 0, 0): -0.0009}), 3)
    assert quirk.problems == [] and quirk.rounded and quirk.labels_present == {0, 1, 2}
    assert quirk.array.dtype == np.uint8 and quirk.array[2, 2, 2] == 2 and quirk.array[0, 0, 0] == 0
    expected = np.zeros((4, 6, 8), np.uint8)
    expected[1:3, 1:4, 1:5] = 1
    expected[2, 2, 2] = 2
    assert np.array_equal(quirk.array, expected)
    exact = clean_mask(mask({(2, 2, 2): 2.0}), 3)  # floats holding exact integers: nothing to round
    assert exact.problems == [] and exact.rounded is False and exact.labels_present == {0, 1, 2}
    near = clean_mask(mask({(2, 2, 2): 1.9995}, np.float64), 3)  # rounded, not truncated
    assert near.array[2, 2, 2] == 2 and near.labels_present == {0, 1, 2}
    # an error of exactly the tolerance is still rounded; here it is the only source of label 0
    edge = np.full((4, 6, 8), 0.001)
    edge[1:3, 1:4, 1:5] = 1
    at_tolerance = clean_mask(edge, 3)
    assert at_tolerance.problems == [] and at_tolerance.labels_present == {0, 1}
    assert at_tolerance.array.sum() == 2 * 3 * 4
    integers = clean_mask(mask({}, np.int16), 3)
    assert integers.problems == [] and integers.rounded is False and integers.labels_present == {0, 1}
    assert integers.array.dtype == np.uint8
    beyond = clean_mask(mask({(1, 1, 1): 1.0011}, np.float64), 3)
    assert beyond.array is None and beyond.problems == [
        "mask holds non-integer values (1.0011); values within 0.001 of an integer are rounded, these are not"]


def test_clean_mask_names_negative_and_undeclared_labels() -> None:
    assert clean_mask(mask({(0, 0, 0): 2}, np.int16), 3).problems == []  # the highest declared label
    assert clean_mask(mask({(0, 0, 0): 3}, np.int16), 3).problems == [
        "mask holds labels 3 outside the declared labels 0..2"]
    assert clean_mask(mask({(0, 0, 0): 2}, np.int16), 2).problems == [
        "mask holds labels 2 outside the declared labels 0..1"]
    both = clean_mask(mask({(0, 0, 0): -1, (0, 0, 1): -2, (3, 5, 7): 4}, np.int16), 3)
    assert both.array is None
    assert both.problems == ["mask holds negative values (-2, -1)",
                             "mask holds labels 4 outside the declared labels 0..2"]
    assert clean_mask(mask({(0, 0, 0): -1.0}), 3).problems == ["mask holds negative values (-1)"]


def test_listed_values_stop_after_five() -> None:
    values = {(0, 0, i): 0.5 + i for i in range(7)}
    problems = clean_mask(mask(values), 10).problems
    assert problems == ["mask holds non-integer values (0.5, 1.5, 2.5, 3.5, 4.5 and 2 more); values within 0.001 "
                        "of an integer are rounded, these are not"]
    assert checks._list_values(np.array([7, 9])) == "7, 9"
    assert checks._list_values(np.arange(5)) == "0, 1, 2, 3, 4"
