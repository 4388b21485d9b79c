"""Scanner-shift and thick-slice augmentation: where they sit in nnU-Net's transforms, what they draw and do, and
that `train` passes them to the trainer's loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.intensity.brightness import BrightnessAdditiveTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from tiny import TINY_DATASET_ID, TINY_PLANS

from nnunet_mtl.cli import build_parser
from nnunet_mtl.training import augmentation
from nnunet_mtl.training.run import TrainSettings, apply_settings, build_trainer


def nnunet_transforms() -> ComposeTransforms:
    """nnU-Net 2.8.1's own training transforms for a small 3D patch (no deep supervision, no mirroring)."""
    return nnUNetTrainer.get_training_transforms((16, 32, 32), (-0.5, 0.5), None, None, False)


def unwrapped(steps) -> list[type]:
    return [type(getattr(t, "transform", t)) for t in steps]


def test_nnunet_setting_leaves_the_transforms_alone_and_unknown_kinds_are_refused():
    transforms = nnunet_transforms()
    assert augmentation.with_intensity_augmentation(transforms, "nnunet") is transforms
    with pytest.raises(ValueError, match="'strong'"):
        augmentation.with_intensity_augmentation(transforms, "strong")


def test_scanner_shift_sits_after_the_spatial_transform_and_before_nnunets_intensity_transforms():
    original = nnunet_transforms()
    steps = augmentation.with_intensity_augmentation(original, "scanner").transforms
    kinds = unwrapped(steps)
    spatial = kinds.index(SpatialTransform)
    added = unwrapped(augmentation.scanner_shift_transforms())
    assert kinds[spatial + 1: spatial + 1 + len(added)] == added
    assert BrightnessAdditiveTransform in added  # the HU offset: nnU-Net draws none
    # nnU-Net's own steps are all still there, in their order, after the added ones
    rest = kinds[:spatial + 1] + kinds[spatial + 1 + len(added):]
    assert rest == unwrapped(original.transforms)
    assert kinds.index(GaussianNoiseTransform) == spatial + len(added)  # our noise step, then nnU-Net's at once


def test_scanner_shift_draws_scale_offset_and_noise_at_their_probabilities():
    """On a constant patch of ones, the patch mean after the shift is m x 1 + offset: untouched patches (no draw
    applied) come at (1 - p_scale)(1 - p_offset)(1 - p_noise), and the drawn ranges stay inside their bounds."""
    shift = ComposeTransforms(augmentation.scanner_shift_transforms())
    means, sds = [], []
    for _ in range(1500):
        image = torch.ones(1, 6, 8, 8)
        out = shift(image=image, segmentation=torch.zeros(1, 6, 8, 8, dtype=torch.int16))["image"]
        means.append(float(out.mean()))
        sds.append(float(out.std()))
    means, sds = np.array(means), np.array(sds)
    untouched = np.mean((np.abs(means - 1) < 1e-6) & (sds < 1e-6))
    expected = ((1 - augmentation.ENHANCEMENT_PROBABILITY) * (1 - augmentation.CALIBRATION_PROBABILITY)
                * (1 - augmentation.NOISE_PROBABILITY))
    assert abs(untouched - expected) < 0.04, (untouched, expected)
    noisy = np.mean(sds > 1e-3)  # noise (variance drawn from (0, 0.2)) is the only step that makes voxels differ
    assert abs(noisy - augmentation.NOISE_PROBABILITY) < 0.04, noisy
    # with no offset drawn a quiet patch's mean is the scale: inside (0.7, 1.3); offsets (SD 0.3) spread it wider
    assert means.min() > augmentation.ENHANCEMENT_SCALE[0] - 5 * augmentation.CALIBRATION_SD
    assert np.std(means) > 0.2  # about sqrt(0.5 x 0.03 + 0.5 x 0.09) = 0.25 with both draws


def reference_thick_slices(volume: np.ndarray, slabs: int) -> np.ndarray:
    """Independent computation: mean over equal slabs along z, then linear interpolation back at the voxel centres
    (half-voxel convention, edges held), column by column with numpy."""
    depth = volume.shape[0]
    thick = volume.reshape(slabs, depth // slabs, *volume.shape[1:]).mean(axis=1)
    centres = np.clip((np.arange(depth) + 0.5) * slabs / depth - 0.5, 0, slabs - 1)
    flat = thick.reshape(slabs, -1)
    back = np.stack([np.interp(centres, np.arange(slabs), flat[:, k]) for k in range(flat.shape[1])], axis=1)
    return back.reshape(volume.shape)


def test_thick_slices_average_along_z_only_as_an_independent_computation_does():
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(16, 6, 5)).astype(np.float32)
    transform = augmentation.ThickSliceTransform(3.0)
    out = transform._apply_to_image(torch.from_numpy(volume.copy())[None], factor=2.0, nearest=False)[0].numpy()
    np.testing.assert_allclose(out, reference_thick_slices(volume, 8), atol=1e-5)
    # nearest neighbour along z (nnU-Net's resampling of very anisotropic scans): each slab mean, repeated
    repeated = transform._apply_to_image(torch.from_numpy(volume.copy())[None], factor=2.0, nearest=True)[0].numpy()
    np.testing.assert_allclose(repeated, np.repeat(volume.reshape(8, 2, 6, 5).mean(axis=1), 2, axis=0), atol=1e-5)
    # a pattern constant along z is untouched (in-plane detail stays); a one-voxel-thin bright slice is spread out
    in_plane = np.broadcast_to(rng.normal(size=(1, 6, 5)), (16, 6, 5)).astype(np.float32)
    for nearest in (False, True):
        np.testing.assert_allclose(transform._apply_to_image(torch.from_numpy(in_plane.copy())[None], factor=2.0,
                                                             nearest=nearest)[0], in_plane, atol=1e-5)
    thin = np.zeros((16, 6, 5), np.float32)
    thin[8] = 1.0
    spread = transform._apply_to_image(torch.from_numpy(thin)[None], factor=2.0, nearest=False)[0].numpy()
    assert spread[:, 0, 0].max() < 0.6 and (spread[:, 0, 0] > 0.05).sum() >= 3
    with pytest.raises(ValueError, match="must exceed 1"):
        augmentation.ThickSliceTransform(1.0)


def test_thick_slices_sit_after_the_spatial_transform_in_half_the_patches_and_only_when_thicker():
    original = nnunet_transforms()
    assert augmentation.with_thick_slices(original, 0.0, 2.0) is original  # off
    assert augmentation.with_thick_slices(original, 2.0, 2.0) is original  # not thicker than the grid
    with pytest.raises(ValueError, match="-1"):
        augmentation.with_thick_slices(original, -1.0, 2.0)
    steps = augmentation.with_thick_slices(original, 5.0, 2.0).transforms
    kinds = unwrapped(steps)
    spatial = kinds.index(SpatialTransform)
    assert kinds[spatial + 1] is augmentation.ThickSliceTransform
    assert steps[spatial + 1].transform.max_factor == pytest.approx(2.5)
    assert kinds[:spatial + 1] + kinds[spatial + 2:] == unwrapped(original.transforms)
    thick = ComposeTransforms([steps[spatial + 1]])
    z_profile = torch.linspace(0, 1, 12)[None, :, None, None].expand(1, 12, 4, 4).clone() ** 2
    changed = np.mean([not torch.allclose(thick(image=z_profile.clone(), segmentation=torch.zeros(
        1, 12, 4, 4, dtype=torch.int16))["image"], z_profile) for _ in range(600)])
    # a factor drawn under 12/11.5 keeps all 12 slabs: a few untouched patches beside the 50 % not drawn
    assert abs(changed - augmentation.THICK_SLICE_PROBABILITY) < 0.07, changed


def test_train_option_reaches_the_trainers_loader(tiny_env):
    for kind in augmentation.INTENSITY_AUGMENTATIONS:  # the CLI offers every kind the trainer knows
        parsed = build_parser().parse_args(["train", str(TINY_DATASET_ID), "--intensity-aug", kind])
        assert parsed.intensity_augmentation == kind
    for kind, has_offset in (("nnunet", False), ("scanner", True)):
        trainer = build_trainer(TINY_DATASET_ID, TINY_PLANS, 0, "cpu")
        apply_settings(trainer, TrainSettings(intensity_augmentation=kind))
        trainer.initialize()
        train_loader, _ = trainer.get_dataloaders()  # nnUNet_n_proc_DA=0: single-threaded, transforms reachable
        kinds = unwrapped(train_loader.data_loader.transforms.transforms)
        assert (BrightnessAdditiveTransform in kinds) is has_offset, kind
    assert build_parser().parse_args(["train", str(TINY_DATASET_ID), "--thick-slices", "4"]).thick_slice_mm == 4.0
    with pytest.raises(SystemExit):  # argparse refuses a negative thickness before any training starts
        build_parser().parse_args(["train", str(TINY_DATASET_ID), "--thick-slices", "-2"])
    trainer = build_trainer(TINY_DATASET_ID, TINY_PLANS, 0, "cpu")
    apply_settings(trainer, TrainSettings(thick_slice_mm=3 * trainer.configuration_manager.spacing[0]))
    trainer.initialize()
    train_loader, _ = trainer.get_dataloaders()
    thick = [getattr(t, "transform", t) for t in train_loader.data_loader.transforms.transforms
             if isinstance(getattr(t, "transform", t), augmentation.ThickSliceTransform)]
    assert len(thick) == 1 and thick[0].max_factor == pytest.approx(3.0)


def reference_lesion_contrast(image: np.ndarray, labels: np.ndarray, factor: float) -> np.ndarray:
    """Independent computation: gland within 3 voxels (Chebyshev) of the lesion as reference, the lesion shifted by
    (factor - 1) * contrast, voxels next to it by the share of lesion voxels in their 3x3x3 neighbourhood."""
    lesion, gland = labels == 2, labels == 1
    points = np.argwhere(lesion)
    grid = np.indices(labels.shape).reshape(3, -1).T
    distance = np.min(np.abs(grid[:, None, :] - points[None, :, :]).max(-1), axis=1).reshape(labels.shape)
    reference = (distance <= 3) & gland
    shift = (factor - 1) * (image[lesion].mean() - image[reference].mean())
    weight = np.zeros(labels.shape)
    for z, y, x in np.ndindex(labels.shape):
        window = lesion[max(z - 1, 0):z + 2, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]
        weight[z, y, x] = 1.0 if lesion[z, y, x] else window.mean()
    return image + shift * weight


def lesion_patch(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros((10, 14, 14), np.int16)
    labels[1:9, 2:12, 2:12] = 1
    labels[3:7, 5:9, 4:8] = 2
    image = rng.normal(0.0, 0.2, labels.shape) + np.where(labels == 1, 1.0, 0.0) + np.where(labels == 2, 3.0, 0.0)
    return image.astype(np.float32), labels


def test_lesion_contrast_moves_the_lesion_mean_as_an_independent_computation_does_and_keeps_its_texture():
    image, labels = lesion_patch(np.random.default_rng(0))
    transform = augmentation.LesionContrastTransform()
    data = {"image": torch.from_numpy(image)[None], "segmentation": torch.from_numpy(labels)[None]}
    for factor in (0.35, 0.5, 1.1):
        transform.factor_range = (factor, factor)
        out = transform(image=data["image"].clone(), segmentation=data["segmentation"].clone())
        result = out["image"][0].numpy()
        np.testing.assert_allclose(result, reference_lesion_contrast(image, labels, factor), atol=1e-5)
        lesion = labels == 2
        gland_mean = image[(labels == 1)].mean()
        assert (result[lesion].mean() - gland_mean) == pytest.approx(factor * (image[lesion].mean() - gland_mean),
                                                                     abs=0.05)
        assert result[lesion].std() == pytest.approx(image[lesion].std(), rel=1e-5)  # texture kept
        far = np.ones_like(lesion)
        far[2:8, 4:10, 3:9] = False  # the lesion and its one-voxel fade
        np.testing.assert_array_equal(result[far], image[far])
        np.testing.assert_array_equal(out["segmentation"][0].numpy(), labels)


def test_lesion_contrast_leaves_patches_without_lesion_or_gland_alone_and_refuses_bad_ranges():
    image, labels = lesion_patch(np.random.default_rng(1))
    transform = augmentation.LesionContrastTransform((0.5, 0.5))
    no_lesion = np.where(labels == 2, 1, labels).astype(np.int16)
    no_gland = np.where(labels == 1, 0, labels).astype(np.int16)
    for seg in (no_lesion, no_gland):
        out = transform(image=torch.from_numpy(image)[None].clone(), segmentation=torch.from_numpy(seg)[None])
        np.testing.assert_array_equal(out["image"][0].numpy(), image)
    for bad in ((-0.1, 1.0), (1.2, 1.0)):
        with pytest.raises(ValueError, match="lesion contrast"):
            augmentation.LesionContrastTransform(bad)


def test_lesion_contrast_sits_after_the_spatial_transform_in_half_the_patches_and_reaches_the_loader(tiny_env):
    original = nnunet_transforms()
    assert augmentation.with_lesion_contrast(original, False) is original
    logged = augmentation.with_lesion_contrast(original, True)
    assert isinstance(logged, augmentation.MovedLesionLog)
    steps = logged.transforms.transforms
    kinds = unwrapped(steps)
    spatial = kinds.index(SpatialTransform)
    assert kinds[spatial + 1] is augmentation.LesionContrastTransform
    assert steps[spatial + 1].apply_probability == augmentation.LESION_CONTRAST_PROBABILITY
    assert kinds[:spatial + 1] + kinds[spatial + 2:] == unwrapped(original.transforms)
    image, labels = lesion_patch(np.random.default_rng(2))
    contrast = ComposeTransforms([steps[spatial + 1]])
    changed = np.mean([not np.array_equal(contrast(image=torch.from_numpy(image)[None].clone(),
                                                   segmentation=torch.from_numpy(labels)[None])["image"][0].numpy(),
                                          image) for _ in range(600)])
    assert abs(changed - augmentation.LESION_CONTRAST_PROBABILITY) < 0.07, changed
    parsed = build_parser().parse_args(["train", str(TINY_DATASET_ID), "--lesion-contrast-aug", "yes"])
    assert parsed.lesion_contrast_augmentation is True
    trainer = build_trainer(TINY_DATASET_ID, TINY_PLANS, 0, "cpu")
    apply_settings(trainer, TrainSettings(lesion_contrast_augmentation=True))
    trainer.initialize()
    train_loader, _ = trainer.get_dataloaders()
    assert augmentation.LesionContrastTransform in unwrapped(train_loader.data_loader.transforms.transforms.transforms)
    batch = next(train_loader)  # nnU-Net's real patches (labels after its spatial transform) go through it
    assert torch.isfinite(batch["data"]).all()
    assert batch["subtype_counts"].shape == batch["subtype"].shape
    assert set(batch["subtype_counts"].tolist()) <= {0.0, 1.0}


def test_moved_lesion_log_flags_exactly_the_patches_whose_lesion_the_augmentation_moved():
    image, labels = lesion_patch(np.random.default_rng(3))
    no_lesion = np.where(labels == 2, 1, labels).astype(np.int16)
    log = augmentation.MovedLesionLog(ComposeTransforms([RandomTransform(augmentation.LesionContrastTransform(),
                                                                         apply_probability=0.5)]))
    changed = []
    for i in range(60):
        seg = no_lesion if i % 3 == 0 else labels  # a patch without lesion is never moved
        out = log(image=torch.from_numpy(image)[None].clone(), segmentation=torch.from_numpy(seg)[None])
        changed.append(not np.array_equal(out["image"][0].numpy(), image))
    assert log.moved == changed  # one flag per call, in call order, true where the image changed
    assert 0 < sum(changed) < 40 and not any(changed[::3])
