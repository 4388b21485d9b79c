"""The phantom dataset: layout and names exactly as published, geometry, labels, the float-mask quirk, determinism,
and subtypes that really differ in what defines them (measured on the written files)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnunet_mtl.cli import main
from nnunet_mtl.cli import phantom as cli_phantom
from nnunet_mtl.data import phantom
from nnunet_mtl.data.phantom import SIZE_CLASSES, SIZE_SHARES, SUBTYPES, generate_phantom_dataset, make_case, plan_cases

TRAIN, VAL, N_TEST = (6, 6, 6), (2, 2, 2), 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("phantom") / "data"
    summary = generate_phantom_dataset(out, seed=11, train_per_subtype=TRAIN, val_per_subtype=VAL, n_test=N_TEST,
                                       progress=False)
    return out, summary


def read(path: Path) -> tuple[sitk.Image, np.ndarray]:
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def test_layout_names_and_counts(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    expected = {"phantom.json", "test_groundtruth/subtype_results.csv"}
    ids = []
    for split, counts in (("train", TRAIN), ("validation", VAL)):
        for k in range(3):
            names = sorted(p.name for p in (out / split / f"subtype{k}").iterdir())
            masks = [n for n in names if re.fullmatch(rf"quiz_{k}_\d{{3}}\.nii\.gz", n)]
            assert len(masks) == counts[k]
            assert names == sorted(masks + [m.replace(".nii.gz", "_0000.nii.gz") for m in masks])
            ids += [m[7:10] for m in masks]
            expected |= {f"{split}/subtype{k}/{n}" for n in names}
    tests = sorted(p.name for p in (out / "test").iterdir())
    assert len(tests) == N_TEST and all(re.fullmatch(r"quiz_\d{3}_0000\.nii\.gz", n) for n in tests)
    ids += [n[5:8] for n in tests]
    expected |= {f"test/{n}" for n in tests} | {f"test_groundtruth/{n.replace('_0000', '')}" for n in tests}
    assert files == expected  # nothing else, no preview unless asked, no leftovers
    assert len(set(ids)) == len(ids) == sum(TRAIN) + sum(VAL) + N_TEST
    assert summary["counts"] == {"train": list(TRAIN), "validation": list(VAL), "test": N_TEST}
    assert json.loads((out / "phantom.json").read_text()) == summary
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # the temporary folder is gone


def test_groundtruth_csv(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    lines = (out / "test_groundtruth" / "subtype_results.csv").read_text().splitlines()
    assert lines[0] == "Names,Subtype"
    rows = dict(csv.reader(lines[1:]))
    truth = {f"{c['name']}.nii.gz": str(c["subtype"]) for c in summary["cases"] if c["split"] == "test"}
    assert rows == truth
    assert all(re.fullmatch(r"quiz_\d{3}\.nii\.gz", name) for name in rows)


def test_test_subtypes_follow_real_proportions() -> None:
    for n_test, expected in ((12, [3, 5, 4]), (72, [18, 30, 24])):
        cases = [c for c in plan_cases("small", 0, n_test=n_test) if c["split"] == "test"]
        assert [sum(c["subtype"] == k for c in cases) for k in range(3)] == expected
    assert [sum(c["split"] == "train" and c["subtype"] == k for c in plan_cases("full")) for k in range(3)] \
        == [62, 106, 84]


def test_geometry_labels_and_hu(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    saw_air = saw_flipped = saw_identity = False
    for case in summary["cases"]:
        image, img = read(out / case["image"])
        mask, lab = read(out / case["mask"])
        assert img.dtype == np.int16 and img.ndim == 3
        assert image.GetSize() == mask.GetSize()
        assert image.GetSpacing() == mask.GetSpacing()
        assert image.GetOrigin() == mask.GetOrigin()
        assert image.GetDirection() == mask.GetDirection()
        sx, sy, sz = image.GetSpacing()
        small = phantom.PRESETS["small"]
        assert sx == sy and small.spacing_xy[0] <= sx <= small.spacing_xy[1] and sz / sx > 1.15
        assert 1.8 <= sz <= 2.2  # near the real 2.0 mm slices
        nx, ny, nz = image.GetSize()
        assert all(lo <= n <= hi for lo, n, hi in zip(small.shape_lo, (nz, ny, nx), small.shape_hi))
        assert set(np.unique(np.rint(lab))) == {0, 1, 2}
        assert (np.rint(lab) == 2).sum() == case["lesion_voxels"] > 0
        assert img.min() >= -1024 and img.max() <= 3071
        assert 0.3 < np.mean((img > -160) & (img < -40)) < 0.85  # fat fills much of the crop, not all of it
        assert (img > 150).any()  # contrast-filled vessels (and bone)
        assert 60 < np.median(img[np.rint(lab) == 1]) < 160  # enhancing parenchyma
        saw_air |= bool((img < -900).any())
        flipped = image.GetDirection() == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
        assert flipped or image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        saw_flipped, saw_identity = saw_flipped or flipped, saw_identity or not flipped
    assert saw_air and saw_flipped and saw_identity


def test_float_mask_quirk(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    kinds = []
    for case in summary["cases"]:
        _, lab = read(out / case["mask"])
        if lab.dtype == np.float32:
            assert set(np.unique(lab).tolist()) == {0.0, 1.0000152587890625, 2.0}
        else:
            assert lab.dtype == np.uint8 and set(np.unique(lab).tolist()) == {0, 1, 2}
        assert case["float_mask_quirk"] == (lab.dtype == np.float32)
        kinds.append(lab.dtype == np.float32)
    assert 0 < sum(kinds) < len(kinds)


def test_subtypes_differ_in_what_defines_them(dataset: tuple[Path, dict]) -> None:
    """Solid hypodense < parenchyma < hyper-enhancing; cysts near water. Measured on the files, per case."""
    out, summary = dataset
    lesion_mean = {0: [], 1: [], 2: []}
    lesion_median = {0: [], 1: [], 2: []}
    parenchyma = []
    below = {0: 0, 2: 0}
    for case in summary["cases"]:
        _, img = read(out / case["image"])
        _, lab = read(out / case["mask"])
        lab = np.rint(lab)
        k, lesion, gland = case["subtype"], img[lab == 2], np.median(img[lab == 1])
        lesion_mean[k].append(lesion.mean())
        lesion_median[k].append(np.median(lesion))
        parenchyma.append(gland)
        if k in below:
            below[k] += lesion.mean() < gland
    means = {k: np.mean(v) for k, v in lesion_mean.items()}
    assert means[2] > np.mean(parenchyma) + 30
    assert np.mean(parenchyma) > means[0] + 20
    assert means[0] > means[1] + 10
    assert -10 < np.median(lesion_median[1]) < 30  # water-like cyst content
    assert below[0] >= 0.75 * len(lesion_mean[0])  # most cases, not just the average
    assert below[2] <= 0.25 * len(lesion_mean[2])


def lesion_ml(mask: sitk.Image) -> float:
    """Lesion volume measured on the written mask: voxels of label 2 times the voxel volume."""
    return float((np.rint(sitk.GetArrayFromImage(mask)) == 2).sum() * np.prod(mask.GetSpacing()) / 1000)


def test_lesion_sizes_range_widely(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    volumes = [lesion_ml(read(out / c["mask"])[0]) for c in summary["cases"]]
    assert max(volumes) / min(volumes) > 20


def test_make_case_is_deterministic_and_seed_dependent() -> None:
    image_a, mask_a, facts_a = make_case([4, 0, 1, 2], 1)
    image_b, mask_b, facts_b = make_case(np.random.default_rng([4, 0, 1, 2]), 1, "small")
    image_c, _, _ = make_case([5, 0, 1, 2], 1)
    for a, b in ((image_a, image_b), (mask_a, mask_b)):
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        assert (a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (b.GetSpacing(), b.GetOrigin(), b.GetDirection())
    assert facts_a == facts_b
    different = sitk.GetArrayFromImage(image_c)
    assert different.shape != sitk.GetArrayFromImage(image_a).shape or \
        not np.array_equal(different, sitk.GetArrayFromImage(image_a))


def test_dataset_is_deterministic(tmp_path: Path) -> None:
    kwargs = {"seed": 5, "train_per_subtype": (1, 1, 1), "val_per_subtype": (1, 1, 1), "n_test": 1, "progress": False}
    first = generate_phantom_dataset(tmp_path / "a", **kwargs)
    second = generate_phantom_dataset(tmp_path / "b", **kwargs)
    assert first == second  # phantom.json holds no timings
    for case in first["cases"]:
        for key in ("image", "mask"):
            a, b = read(tmp_path / "a" / case[key])[1], read(tmp_path / "b" / case[key])[1]
            assert a.dtype == b.dtype and np.array_equal(a, b)


def test_cases_do_not_change_with_counts() -> None:
    small = {(c["split"], c["subtype"], tuple(c["seed"]), c["size_class"])
             for c in plan_cases("small", 2, (1, 1, 1), (1, 1, 1), 0)}
    large = {(c["split"], c["subtype"], tuple(c["seed"]), c["size_class"])
             for c in plan_cases("small", 2, (3, 1, 2), (1, 2, 1), 5)}
    assert small <= large


def test_size_classes_are_stratified_per_split_and_subtype() -> None:
    cases = plan_cases("small", 0)
    for split in ("train", "validation", "test"):
        for k in SUBTYPES:
            group = [c for c in cases if c["split"] == split and c["subtype"] == k]
            for size_class, share in zip(SIZE_CLASSES, SIZE_SHARES):
                count = sum(c["size_class"] == size_class for c in group)
                assert abs(count - share * len(group)) <= 1, (split, k, size_class, count, len(group))
    # each split as a whole holds its share of tiny lesions to within one case per subtype
    train = [c for c in cases if c["split"] == "train"]
    assert abs(sum(c["size_class"] == "tiny" for c in train) - 0.1 * len(train)) <= len(SUBTYPES)


def test_make_case_draws_the_size_class_it_is_given() -> None:
    volumes = {}
    for size_class in SIZE_CLASSES:
        _, mask, facts = make_case([3, 0, 0, 1], 0, "small", size_class)
        assert facts["size_class"] == size_class
        volumes[size_class] = lesion_ml(mask)
    assert volumes["tiny"] < volumes["medium"] < volumes["large"]
    assert 0.04 <= volumes["tiny"] <= 0.22  # the README's range of tiny lesions in the small preset
    with pytest.raises(ValueError, match="size_class"):
        make_case([3, 0, 0, 1], 0, "small", "huge")


def test_full_preset_case_has_real_geometry() -> None:
    image, mask, facts = make_case(0, 2, "full")
    sx, sy, sz = image.GetSpacing()
    nx, ny, nz = image.GetSize()
    assert 40 <= nz <= 90 and 120 <= ny <= 260 and 150 <= nx <= 300
    assert sx == sy and 0.65 < sx < 0.85 and 1.75 <= sz <= 2.5
    labels, hu = np.rint(sitk.GetArrayFromImage(mask)), sitk.GetArrayFromImage(image)
    assert mask.GetSize() == image.GetSize() and (labels == 2).sum() == facts["lesion_voxels"] > 0
    assert hu[labels == 2].mean() > np.median(hu[labels == 1]) + 20  # subtype 2: hyper-enhancing, measured


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="subtype"):
        make_case(0, 3)
    with pytest.raises(ValueError, match="preset"):
        plan_cases("huge")
    with pytest.raises(ValueError, match="at least 1"):
        plan_cases("small", train_per_subtype=(1, 0, 1))
    with pytest.raises(ValueError, match="at most"):
        plan_cases("small", n_test=1000)


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing(*args: object) -> object:
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return make_case(*args)

    monkeypatch.setattr(phantom, "make_case", failing)
    with pytest.raises(RuntimeError):
        generate_phantom_dataset(tmp_path / "data", train_per_subtype=(1, 1, 1), val_per_subtype=(1, 1, 1),
                                 n_test=0, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    small = ["--cases-per-subtype", "1,1,1", "--val-per-subtype", "1,1,1", "--test-cases", "2"]
    assert main(["phantom", "--out", str(out), "--seed", "3", "--preview", *small]) == 0
    assert "wrote 8 phantom cases" in capsys.readouterr().out
    assert len(list((out / "train").glob("subtype*/*_0000.nii.gz"))) == 3
    assert len(list((out / "validation").glob("subtype*/*_0000.nii.gz"))) == 3
    assert len(list((out / "test").glob("quiz_*_0000.nii.gz"))) == 2
    assert len(list((out / "test_groundtruth").glob("quiz_*.nii.gz"))) == 2
    pngs = sorted(p.name for p in (out / "preview").glob("*.png"))
    assert [p[:8] for p in pngs] == ["subtype0", "subtype1", "subtype2"]
    assert all((out / "preview" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert json.loads((out / "phantom.json").read_text())["preview"] == [f"preview/{p}" for p in pngs]

    assert main(["phantom", "--out", str(out), *small]) == 2  # non-empty without --force
    assert "not empty" in capsys.readouterr().err
    assert main(["phantom", "--out", str(out), "--seed", "4", "--force", *small]) == 0
    assert json.loads((out / "phantom.json").read_text())["seed"] == 4
    assert not (out / "preview").exists()

    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["phantom", "--out", str(other), "--force", *small]) == 2  # --force replaces phantom data only
    assert [p.name for p in other.iterdir()] == ["keep.txt"]

    with pytest.raises(SystemExit) as exit_info:
        main(["phantom", "--out", str(tmp_path / "x"), "--cases-per-subtype", "1,2"])
    assert exit_info.value.code == 2


def test_cli_presets_match_generator() -> None:
    assert cli_phantom.PRESETS == tuple(phantom.PRESETS)


def test_cli_sites_match_generator() -> None:
    assert cli_phantom.SITES == tuple(phantom.SITES)


def test_sites_differ_as_their_profiles_say() -> None:
    """Measured on the images: site B's slices are 1.5x site A's with the field of view kept, its noise is higher,
    its parenchyma enhances less and its hyper-enhancing lesions stand out less; other sites draw other patients."""
    def draw(site: str, index: int) -> dict:
        case = next(c for c in phantom.plan_cases("small", 3, (3, 3, 3), (1, 1, 1), 0, site=site)
                    if c["subtype"] == 2 and c["split"] == "train" and c["seed"][-1] == index)
        image, mask, _ = phantom.make_case(case["seed"], 2, "small", "medium", site)
        hu = sitk.GetArrayFromImage(image).astype(float)
        labels = np.rint(sitk.GetArrayFromImage(mask))
        fat = (hu < -60) & (hu > -150) & (labels == 0)
        return {"hu": hu, "z_spacing": image.GetSpacing()[2],
                "fov_y": image.GetSize()[1] * image.GetSpacing()[1],
                "noise": float(np.std((hu - ndimage.uniform_filter(hu, 5))[fat])),
                "parenchyma": float(np.median(hu[labels == 1])),
                "contrast": float(np.median(hu[labels == 2]) - np.median(hu[labels == 1]))}

    site_a, site_b = [draw("A", i) for i in range(3)], [draw("B", i) for i in range(3)]
    for a, b in zip(site_a, site_b):
        assert a["hu"].shape != b["hu"].shape or not np.array_equal(a["hu"], b["hu"])  # other patients

    def mean(cases: list[dict], key: str) -> float:
        return float(np.mean([c[key] for c in cases]))

    assert mean(site_b, "z_spacing") == pytest.approx(1.5 * mean(site_a, "z_spacing"), rel=0.25)
    assert np.ptp([c["fov_y"] for c in site_a + site_b]) < 0.35 * mean(site_a + site_b, "fov_y")
    assert mean(site_b, "noise") > mean(site_a, "noise")
    assert mean(site_b, "parenchyma") < mean(site_a, "parenchyma")
    assert mean(site_b, "contrast") < mean(site_a, "contrast")
    with pytest.raises(ValueError, match="unknown site"):
        phantom.make_case(0, 0, "small", site="Z")
