"""The multi-task trainer on the tiny phantom dataset (CPU, a handful of iterations)."""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight
from tiny import TINY_DATASET_ID, TINY_PLANS, TINY_TRAIN_PER_SUBTYPE

from nnunet_mtl.cli import main as cli_main
from nnunet_mtl.inference import lesion_filters
from nnunet_mtl.training.dataloader import (
    SMALL_LESION_ML,
    case_sampling_probabilities,
    class_balanced_probabilities,
    small_lesion_weights,
)
from nnunet_mtl.training.fold_decisions import load_evidence
from nnunet_mtl.training.run import TrainSettings, apply_settings, build_trainer, find_resume_checkpoint, train


def make_trainer(fold=0, **settings):
    trainer = build_trainer(TINY_DATASET_ID, TINY_PLANS, fold, "cpu")
    apply_settings(trainer, TrainSettings(**settings))
    trainer.initialize()
    return trainer


def first_batch(trainer):
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    return next(trainer.dataloader_train)


def subtype_in_name(case: str) -> int:
    """The published names carry the subtype: quiz_<subtype>_<id>; an independent truth for the loader's table."""
    prefix, subtype, number = case.split("_")
    assert prefix == "quiz" and len(number) == 3
    return int(subtype)


def test_batches_carry_the_subtype_of_their_cases(tiny_env):
    trainer = make_trainer()
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    seen = set()
    for _ in range(4):
        batch = next(trainer.dataloader_train)
        assert batch["subtype"].tolist() == [subtype_in_name(k) for k in batch["keys"]]
        assert batch["data"].shape[2:] == tuple(trainer.configuration_manager.patch_size)
        seen |= set(batch["subtype"].tolist())
    assert len(seen) >= 2  # more than one subtype went by, so a constant could not pass


def test_lesion_centred_patches_contain_lesion(tiny_env):
    trainer = make_trainer(oversample_foreground_percent=1.0, lesion_centred_sampling=True)
    trainer.dataloader_train, _ = trainer.get_dataloaders()
    loader = trainer.dataloader_train.data_loader
    hits = []
    for _ in range(6):
        batch = loader.generate_train_batch()
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        hits += [(t == 2).any().item() for t in target]
    # every forced patch is centred on a lesion voxel; augmentation may move the rim, not the centre away
    assert all(hits)


def test_class_balanced_probabilities_equalise_subtypes():
    subtypes = {"a": 0, "b": 1, "c": 1, "d": 1, "e": 2, "f": 2}
    p = class_balanced_probabilities(list(subtypes), subtypes)
    per_class = {c: p[[i for i, k in enumerate(subtypes) if subtypes[k] == c]].sum() for c in (0, 1, 2)}
    assert np.allclose(list(per_class.values()), 1 / 3) and np.isclose(p.sum(), 1)


def test_small_lesion_weights_follow_the_documented_rule():
    # no lesion, 0.05 ml, 0.2 ml, 0.5 ml, exactly 1 ml, 3 ml: min(factor, 1 ml / v) under 1 ml, else 1
    volumes = [0.0, 0.05, 0.2, 0.5, 1.0, 3.0]
    assert small_lesion_weights(volumes, 4.0).tolist() == [1.0, 4.0, 4.0, 2.0, 1.0, 1.0]
    assert small_lesion_weights(volumes, 1.5).tolist() == [1.0, 1.5, 1.5, 1.5, 1.0, 1.0]
    assert small_lesion_weights(volumes, 1.0).tolist() == [1.0] * 6
    with pytest.raises(ValueError, match=">= 1"):
        small_lesion_weights(volumes, 0.5)
    with pytest.raises(ValueError, match="finite"):
        small_lesion_weights([0.1, -1.0], 4.0)


def test_case_sampling_multiplies_class_balance_and_small_lesion_weights():
    subtypes = {"a": 0, "b": 1, "c": 1, "d": 2}
    ids = list(subtypes)
    volumes = [0.25, 0.25, 2.0, 0.0]
    assert case_sampling_probabilities(ids, subtypes, False) is None  # nnU-Net's uniform draw
    # written out: class balance gives a 1/3, b and c 1/6 each, d 1/3; lesions give 4, 4, 1, 1
    expected = np.array([1 / 3 * 4, 1 / 6 * 4, 1 / 6 * 1, 1 / 3 * 1])
    p = case_sampling_probabilities(ids, subtypes, True, volumes, 4.0)
    assert np.allclose(p, expected / expected.sum())
    p = case_sampling_probabilities(ids, subtypes, False, volumes, 4.0)
    assert np.allclose(p, np.array([4, 4, 1, 1]) / 10)
    with pytest.raises(ValueError, match="one lesion volume per training case"):
        case_sampling_probabilities(ids, subtypes, False, volumes[:2], 4.0)


def test_small_lesion_oversampling_reaches_the_loader_with_each_cases_lesion_volume(tiny_env):
    """The loader's draw probabilities, case by case, against lesion volumes counted independently on the raw masks
    (SimpleITK, the cases' own spacing; the plans' resampling moves a volume by a few per cent)."""
    import SimpleITK as sitk

    factor = 50.0
    trainer = make_trainer(small_lesion_oversampling=factor)
    loader = trainer.get_dataloaders()[0].data_loader
    drawn = dict(zip(loader.indices, loader.sampling_probabilities))
    raw_ml = {}
    for case in drawn:
        mask = sitk.ReadImage(str(tiny_env["raw"] / "labelsTr" / f"{case}.nii.gz"))
        raw_ml[case] = float((sitk.GetArrayFromImage(mask) == 2).sum()) * np.prod(mask.GetSpacing()) / 1000
    expected = {k: min(factor, SMALL_LESION_ML / v) if 0 < v < SMALL_LESION_ML else 1.0 for k, v in raw_ml.items()}
    total = sum(expected.values())
    for case, p in drawn.items():
        assert p == pytest.approx(expected[case] / total, rel=0.15), (case, raw_ml[case])
    assert np.isclose(sum(drawn.values()), 1)
    assert max(drawn.values()) > 1.5 * min(drawn.values())  # the volumes differ enough that uniform cannot pass
    assert make_trainer().get_dataloaders()[0].data_loader.sampling_probabilities is None  # off by default


def test_inverse_frequency_class_weights_follow_the_training_split(tiny_env):
    """The tiny training split is imbalanced (2/2/3), so weights of 1 (weighting off) cannot pass."""
    splits = json.loads((tiny_env["raw"] / "splits_final.json").read_text())
    subtypes = [subtype_in_name(k) for k in splits[0]["train"]]
    assert np.bincount(subtypes).tolist() == list(TINY_TRAIN_PER_SUBTYPE)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=subtypes)  # n / (classes x count)
    assert np.allclose(expected, [7 / 6, 7 / 6, 7 / 9])
    trainer = make_trainer()
    assert np.allclose(trainer.classification_loss.weight.numpy(), expected)
    assert make_trainer(class_weighting="none").classification_loss.weight is None
    # the weighted mean of the loss, written out: sum of w_y x CE over sum of w_y
    trainer.subtype_loss_on_lesion_patches_only = False
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 1.5]])
    subtype = torch.tensor([0, 2, 2])
    ce = -torch.log_softmax(logits, 1)[torch.arange(3), subtype]
    w = torch.tensor(expected, dtype=torch.float32)[subtype]
    loss = trainer._subtype_loss(logits, subtype, torch.zeros(3, 1, 2, 2, 2))
    assert torch.isclose(loss, (w * ce).sum() / w.sum())  # each class weight counted once, as torch's mean
    trainer.subtype_loss_on_lesion_patches_only = True
    target = torch.zeros(3, 1, 2, 2, 2)
    target[1:, 0, 0, 0, 0] = 2  # the second and third patch show lesion
    loss = trainer._subtype_loss(logits, subtype, target)
    assert torch.isclose(loss, (w[1:] * ce[1:]).sum() / w[1:].sum())


def test_subtype_loss_ignores_patches_that_do_not_show_the_lesion(tiny_env):
    trainer = make_trainer(class_weighting="none", subtype_loss_on_lesion_patches_only=True)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    subtype = torch.tensor([2, 1])
    target = torch.zeros(2, 1, 4, 8, 8)
    target[1, 0, 1, 2, 2] = 2  # only the second patch shows lesion
    loss = trainer._subtype_loss(logits, subtype, target)
    assert torch.isclose(loss, torch.nn.functional.cross_entropy(logits[1:], subtype[1:]))
    target[0, 0, 0, 0, 0] = 2
    both = trainer._subtype_loss(logits, subtype, target)
    assert torch.isclose(both, torch.nn.functional.cross_entropy(logits, subtype))
    assert trainer._subtype_loss(logits, subtype, torch.zeros_like(target)) == 0
    moved_first = trainer._subtype_loss(logits, subtype, target, torch.tensor([0.0, 1.0]))
    assert torch.isclose(moved_first, torch.nn.functional.cross_entropy(logits[1:], subtype[1:]))


def test_head_learns_at_a_scaled_rate_through_the_poly_schedule(tiny_env):
    trainer = make_trainer(initial_lr=0.01)
    trainer.head_lr_scale = 0.1
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.lr_scheduler.step(5)
    body, head = trainer.optimizer.param_groups
    expected = 0.01 * (1 - 5 / trainer.num_epochs) ** 0.9
    assert np.isclose(body["lr"], expected) and np.isclose(head["lr"], 0.1 * expected)
    assert {id(p) for p in head["params"]} == {id(p) for p in trainer.model.classifier.parameters()}
    assert len(body["params"]) + len(head["params"]) == len(list(trainer.network.parameters()))


def test_adamw_option_builds_adamw_at_its_own_default_rate(tiny_env):
    trainer = make_trainer(optimizer="adamw")
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.initial_lr == pytest.approx(2e-3)  # not nnU-Net's SGD rate of 0.01
    trainer.lr_scheduler.step(0)
    body, head = trainer.optimizer.param_groups
    assert body["lr"] == pytest.approx(2e-3) and head["lr"] == pytest.approx(trainer.head_lr_scale * 2e-3)
    assert isinstance(make_trainer(optimizer="adamw", initial_lr=3e-4).optimizer, torch.optim.AdamW)
    assert make_trainer(optimizer="adamw", initial_lr=3e-4).initial_lr == pytest.approx(3e-4)
    assert isinstance(make_trainer().optimizer, torch.optim.SGD)  # nnU-Net's stays the default
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        make_trainer(optimizer="adam")


def test_augmentation_options_drop_mirroring_and_narrow_rotation(tiny_env):
    default = make_trainer()
    rotation, _, default_initial, mirror_axes = default.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert mirror_axes == (0, 1, 2) and default.inference_allowed_mirroring_axes == (0, 1, 2)
    trainer = make_trainer(mirror_augmentation=False, max_rotation_degrees=10)
    rotation, _, initial, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert mirror_axes is None and trainer.inference_allowed_mirroring_axes is None
    assert np.allclose(rotation, (-np.deg2rad(10), np.deg2rad(10)))
    # less rotation needs less margin around the patch before cropping it
    assert all(a <= b for a, b in zip(initial, default_initial)) and list(initial) != list(default_initial)


def test_resuming_with_another_optimizer_is_refused(tiny_env, tmp_path):
    sgd = make_trainer()
    sgd.save_checkpoint(str(tmp_path / "sgd.pth"))
    adamw = make_trainer(optimizer="adamw")
    with pytest.raises(ValueError, match="optimizer 'sgd'.*--optimizer sgd"):
        adamw.load_checkpoint(str(tmp_path / "sgd.pth"))


def test_freezing_the_encoder_keeps_its_weights(tiny_env):
    trainer = make_trainer(frozen_parts=("encoder",))
    batch = first_batch(trainer)
    encoder_before = {k: v.clone() for k, v in trainer.model.encoder.state_dict().items()}
    head_before = {k: v.clone() for k, v in trainer.model.classifier.state_dict().items()}
    trainer.network.train()
    for _ in range(2):
        trainer.train_step(batch)
    for key, value in trainer.model.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key
    assert any(not torch.equal(v, head_before[k]) for k, v in trainer.model.classifier.state_dict().items())


def test_freezing_the_head_keeps_its_weights(tiny_env):
    trainer = make_trainer(frozen_parts=("head",))
    batch = first_batch(trainer)
    head_before = {k: v.clone() for k, v in trainer.model.classifier.state_dict().items()}
    trainer.network.train()
    trainer.train_step(batch)
    for key, value in trainer.model.classifier.state_dict().items():
        assert torch.equal(value, head_before[key]), key


def test_joint_loss_falls_on_an_easy_batch(tiny_env):
    """A few dozen steps on one fixed batch: the joint loss (Dice+CE with deep supervision + subtype CE) falls."""
    trainer = make_trainer(initial_lr=0.01)
    batch = first_batch(trainer)
    trainer.network.train()
    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(30)]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_lesion_loss_weight_weighs_lesion_voxels_in_the_cross_entropy(tiny_env):
    """Issue 17's loss lever: the deep-supervision Dice+CE whose CE counts lesion voxels W times, checked against
    torch's weighted cross-entropy computed directly (the Dice part is unchanged)."""
    plain, weighted = make_trainer(), make_trainer(lesion_loss_weight=4.0)
    assert weighted.loss.loss.ce.weight.tolist() == [1.0, 1.0, 4.0] and plain.loss.loss.ce.weight is None
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 8, 8)
    target = torch.randint(0, 3, (2, 1, 4, 8, 8)).float()
    for trainer, w in ((plain, 1.0), (weighted, 4.0)):
        inner = trainer.loss.loss
        expected = torch.nn.functional.cross_entropy(logits, target[:, 0].long(), weight=torch.tensor([1.0, 1.0, w]))
        assert inner.ce(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
        assert inner(logits, target).item() == pytest.approx(expected.item() + inner.dc(logits, target).item(),
                                                             rel=1e-5)
    with pytest.raises(ValueError, match="lesion loss weight"):
        make_trainer(lesion_loss_weight=0.0)


@pytest.mark.parametrize("bf16", [False, True])
def test_cpu_precision_choice_runs_the_forward_pass_as_asked(tiny_env, bf16):
    """bfloat16 autocast on CPU only where asked (opt-in), fp32 losses either way."""
    trainer = make_trainer(cpu_bf16=bf16)
    batch = first_batch(trainer)
    seen = []
    hook = trainer.network.encoder.register_forward_hook(lambda module, args, out: seen.append(out[-1].dtype))
    result = trainer.train_step(batch)
    hook.remove()
    assert seen == [torch.bfloat16 if bf16 else torch.float32]
    assert all(np.isfinite(float(result[k])) for k in ("loss", "seg_loss", "cls_loss"))
    assert make_trainer().cpu_bf16 is False  # opt-in


def test_bf16_step_with_a_non_finite_gradient_is_skipped(tiny_env, monkeypatch):
    trainer = make_trainer(cpu_bf16=True)
    # the forward in fp32, so that only the injected NaN is non-finite (bfloat16 itself may give one, as measured)
    monkeypatch.setattr(trainer, "_autocast", contextlib.nullcontext)
    batch = first_batch(trainer)
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    weight = trainer.network.encoder.stages[0][0].convs[0].conv.weight
    hook = weight.register_hook(lambda grad: grad * float("nan"))
    trainer.train_step(batch)
    hook.remove()
    assert trainer.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.network.state_dict().items())
    trainer.train_step(batch)  # a finite step goes through
    assert trainer.skipped_steps == 1
    assert not torch.equal(before["encoder.stages.0.0.convs.0.conv.weight"], weight.detach())


@pytest.fixture()
def fold_1_removed_afterwards(tiny_env):
    """Fold 1 lands in the tiny model's folder; predictors that load every fold must not find it afterwards."""
    yield
    shutil.rmtree(build_trainer(TINY_DATASET_ID, TINY_PLANS, 1, "cpu").output_folder, ignore_errors=True)


def test_resume_at_the_command_line_restores_epoch_weights_optimizer_and_logger(tiny_env, fold_1_removed_afterwards,
                                                                               monkeypatch, capsys):
    """Interrupt in the third epoch; `nnunet-mtl train --resume` continues after the last finished epoch with the
    state the run held in memory then (not compared with the file it was loaded from), and trains one epoch."""
    from nnunet_mtl.training.trainer import nnUNetTrainerMTL

    settings = TrainSettings(epochs=3, iterations=2, val_iterations=1, case_validation_every=1)
    steps, at_epoch_end = {"n": 0, "interrupt_at": 5}, {}
    original_step, original_end = nnUNetTrainerMTL.train_step, nnUNetTrainerMTL.on_epoch_end

    def counted_step(self, batch):
        steps["n"] += 1
        if steps["n"] == steps["interrupt_at"]:  # first step of the third epoch
            raise KeyboardInterrupt
        return original_step(self, batch)

    def remembered_end(self):
        original_end(self)  # saves checkpoint_latest.pth, then counts the epoch
        at_epoch_end[self.current_epoch] = {
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "weights": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "train_losses": list(self.logger.get_value("train_losses", step=None))}

    monkeypatch.setattr(nnUNetTrainerMTL, "train_step", counted_step)
    monkeypatch.setattr(nnUNetTrainerMTL, "on_epoch_end", remembered_end)
    with pytest.raises(KeyboardInterrupt):
        train(TINY_DATASET_ID, TINY_PLANS, 1, "cpu", settings, validate=False)
    assert sorted(at_epoch_end) == [1, 2]
    interrupted = at_epoch_end[2]

    trainer = build_trainer(TINY_DATASET_ID, TINY_PLANS, 1, "cpu", continue_training=True)
    checkpoint_file = find_resume_checkpoint(trainer.output_folder)
    assert checkpoint_file is not None and checkpoint_file.name == "checkpoint_latest.pth"
    assert torch.load(checkpoint_file, map_location="cpu", weights_only=True)["current_epoch"] == 2  # loads safely
    apply_settings(trainer, settings)
    trainer.initialize()
    trainer.load_checkpoint(str(checkpoint_file))
    assert trainer.current_epoch == 2
    for key, value in interrupted["weights"].items():
        assert torch.equal(trainer.model.state_dict()[key], value), key
    restored = trainer.optimizer.state_dict()
    assert len(restored["state"]) == len(interrupted["optimizer"]["state"]) > 0
    for index, state in interrupted["optimizer"]["state"].items():
        assert torch.equal(restored["state"][index]["momentum_buffer"], state["momentum_buffer"]), index
    assert trainer.logger.get_value("train_losses", step=None) == interrupted["train_losses"]
    assert len(trainer.logger.get_value("val_cls_macro_f1", step=None)) == 2

    steps.update(n=0, interrupt_at=0)
    code = cli_main(["train", str(TINY_DATASET_ID), "--plans", TINY_PLANS, "--fold", "1", "--device", "cpu",
                     "--epochs", "3", "--iterations", "2", "--val-iterations", "1", "--case-validation-every", "1",
                     "--no-validation", "--resume", "--workdir", str(tiny_env["workdir"])])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"resuming from {checkpoint_file} at epoch 2" in printed and "model folder:" in printed
    assert steps["n"] == 2  # the third epoch only
    folder = Path(trainer.output_folder)
    final = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert final["current_epoch"] == 3 and not (folder / "checkpoint_latest.pth").exists()
    curves = json.loads((folder / "training_curves.json").read_text())
    assert curves["train_losses"][:2] == pytest.approx(interrupted["train_losses"])
    assert len(curves["train_losses"]) == 3 and len(curves["combined_score"]) == 3
    assert (folder / "progress.png").is_file() and (folder / "progress_classification.png").is_file()


def test_best_checkpoint_follows_the_ema_of_the_combined_score(tiny_env, tmp_path, monkeypatch):
    """Five scripted epochs. The raw combined score peaks in epoch 1 and nnU-Net's pseudo-Dice EMA in epoch 4; the
    EMA of the combined score (0.8 x previous + 0.2 x new) peaks in epoch 3, which must be checkpoint_best."""
    trainer = make_trainer(epochs=5, case_validation_every=1)
    trainer.output_folder, trainer.log_file = str(tmp_path), str(tmp_path / "log.txt")
    monkeypatch.setattr(trainer, "plot_progress", lambda curves: None)
    monkeypatch.setattr(trainer, "write_training_curves", lambda: None)
    # (whole-pancreas Dice, lesion Dice, macro-F1) per epoch; combined = 0.5 x (p + l) / 2 + 0.5 x F1, by hand
    case_level = iter([(0.6, 0.2, 0.3), (1.0, 0.8, 0.9), (0.8, 0.4, 0.6), (0.8, 0.4, 0.6), (0.4, 0.0, 0.2)])
    combined = [0.35, 0.9, 0.6, 0.6, 0.2]
    ema = [0.35, 0.46, 0.488, 0.5104, 0.44832]
    pseudo_dice = [0.5, 0.5, 0.5, 0.5, 0.99]
    keys = ("val_case_pancreas_dice", "val_case_lesion_dice", "val_cls_macro_f1")
    monkeypatch.setattr(trainer, "case_level_validation",
                        lambda: {**dict(zip(keys, next(case_level))), "val_cls_accuracy": 0.5})
    for d in pseudo_dice:
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        trainer.on_train_epoch_end([{"loss": np.array(1.0), "seg_loss": np.array(0.7), "cls_loss": np.array(1.0)}])
        trainer.on_validation_epoch_start()
        hard = {"tp_hard": np.full(2, 50 * d), "fp_hard": np.full(2, 50 * (1 - d)), "fn_hard": np.full(2, 50 * (1 - d))}
        trainer.on_validation_epoch_end([{"loss": np.array(0.9), "seg_loss": np.array(0.6),
                                          "cls_loss": np.array(1.0), **hard}])
        trainer.on_epoch_end()
    log = trainer.logger.get_value
    assert log("combined_score", step=None) == pytest.approx(combined)
    assert log("ema_combined_score", step=None) == pytest.approx(ema)
    assert int(np.argmax(log("ema_fg_dice", step=None))) == 4 and int(np.argmax(combined)) == 1  # the other rules
    best = torch.load(tmp_path / "checkpoint_best.pth", map_location="cpu", weights_only=True)
    assert best["current_epoch"] == 4  # written at the end of epoch 3 (counted from 0)
    assert best["_best_combined"] == pytest.approx(0.5104) and trainer._best_combined == pytest.approx(0.5104)


def test_progress_figures_at_the_first_and_last_epoch_and_at_most_once_a_minute_between(tiny_env, tmp_path,
                                                                                          monkeypatch):
    """Five scripted epochs ending 25 s apart: figures at epoch 0, at epoch 3 (75 s after the last ones) and at
    epoch 4 (the last); training_curves.json at every epoch."""
    trainer = make_trainer(epochs=5, case_validation_every=1)
    trainer.output_folder, trainer.log_file = str(tmp_path), str(tmp_path / "log.txt")
    monkeypatch.setattr("nnunet_mtl.training.trainer.time", lambda: 25.0 * trainer.current_epoch)
    drawn = []
    monkeypatch.setattr(trainer.logger, "plot_progress_png", lambda folder: drawn.append(trainer.current_epoch))
    monkeypatch.setattr(trainer, "save_checkpoint", lambda path: None)
    monkeypatch.setattr(trainer, "case_level_validation", lambda: {
        "val_case_pancreas_dice": 0.5, "val_case_lesion_dice": 0.5, "val_cls_macro_f1": 0.5, "val_cls_accuracy": 0.5})
    written = []
    for _ in range(5):
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        trainer.on_train_epoch_end([{"loss": np.array(1.0), "seg_loss": np.array(0.7), "cls_loss": np.array(1.0)}])
        trainer.on_validation_epoch_start()
        hard = {"tp_hard": np.full(2, 25.0), "fp_hard": np.full(2, 25.0), "fn_hard": np.full(2, 25.0)}
        trainer.on_validation_epoch_end([{"loss": np.array(0.9), "seg_loss": np.array(0.6),
                                          "cls_loss": np.array(1.0), **hard}])
        trainer.on_epoch_end()
        curves = json.loads((tmp_path / "training_curves.json").read_text())
        written.append(len(curves["train_losses"]))
    assert written == [1, 2, 3, 4, 5]
    assert drawn == [0, 3, 4]
    assert (tmp_path / "progress_classification.png").is_file()


def test_initial_weights_from_a_segmentation_only_nnunet_checkpoint(tiny_env, tmp_path):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    trainer = make_trainer()
    cm = trainer.configuration_manager
    kwargs = dict(cm.network_arch_init_kwargs)
    backbone = kwargs.pop("backbone")
    for key in ("num_subtypes", "head"):
        kwargs.pop(key)
    plain = get_network_from_plans(backbone, kwargs, cm.network_arch_init_kwargs_req_import, 1, 3,
                                   deep_supervision=True)
    torch.save({"network_weights": plain.state_dict()}, tmp_path / "nnunet.pth")
    fresh = trainer.load_initial_weights(tmp_path / "nnunet.pth")
    assert fresh and all(k.startswith("classifier.") for k in fresh)
    for key, value in plain.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key], value)


def test_trained_model_folder_has_validation_outputs(tiny_model):
    fold = tiny_model / "fold_0"
    assert (tiny_model / "plans.json").is_file() and (tiny_model / "dataset.json").is_file()
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["trainer_name"] == "nnUNetTrainerMTL"
    metrics = json.loads((fold / "validation" / "metrics.json").read_text())
    assert metrics["n_cases"] == 3  # one validation case per subtype
    header = (fold / "validation" / "subtype_results.csv").read_text().splitlines()[0]
    assert header == "Names,Subtype"
    # issue 17: the false-lesion filters are decided beside the largest-component step, from the same 3 cases,
    # and the validation predictions carry their scored lesion components
    decision = json.loads((tiny_model / "postprocessing.json").read_text())
    assert {"keep_largest_component", "lesion_filters"} <= set(decision)
    filters = decision["lesion_filters"]
    assert filters["validation"]["cases"] == 3 and filters["validation"]["true_lesions"] >= 3
    assert len(filters["grid"]) >= 30 and any(row["admissible"] for row in filters["grid"])
    chosen, without = filters["validation"]["chosen"], filters["validation"]["without_filters"]
    assert chosen["detected"] == without["detected"]
    if without["detected"] >= 3:
        assert chosen["false_positives"] == min(r["false_positives"] for r in filters["grid"] if r["admissible"])
    else:  # a one-iteration model finds (almost) nothing: no evidence to filter by
        assert filters["description"] == "none" and chosen == without
    assert (fold / "validation" / "lesion_candidates.csv").is_file()
    assert metrics["lesions"]["n_cases"] == 3 and metrics["lesions"]["froc"] is not None
    # the evidence for deciding over several folds (fold_decisions.py) is stored, and it is this decision's
    scores, evidence = load_evidence(fold / "validation")
    assert sorted(scores) == sorted(evidence) and len(scores) == 3
    assert decision["score_without"] == pytest.approx(np.mean([s[0] for s in scores.values()]))
    assert decision["score_with"] == pytest.approx(np.mean([s[1] for s in scores.values()]))
    largest = decision["keep_largest_component"]
    assert lesion_filters.choose([evidence[c][largest] for c in scores], not largest)["grid"] == filters["grid"]


def test_validation_stores_each_case_under_every_acquisition_shift_and_calibrates_on_them(tiny_model):
    """Training's validation predicts each validation case once per kind of shift (shift_calibration.py) and the
    head's temperature in the model folder is the one fitted on those copies with the clean cases."""
    from nnunet_mtl.model.subtype_classifier import load_classifier
    from nnunet_mtl.training.shift_calibration import ACQUISITION_SHIFTS
    from nnunet_mtl.training.subtype_fit import fit_classifier, load_records

    records = load_records(tiny_model / "fold_0")
    shifted = records["validation_shifted"]
    assert len(shifted) == len(records["validation"]) * len(ACQUISITION_SHIFTS)
    assert {r["case"] for r in shifted} == {r["case"] for r in records["validation"]}
    assert {r["shift"].split("@")[0] for r in shifted} == set(ACQUISITION_SHIFTS)
    clean = {r["case"]: r["fold_logits"] for r in records["validation"]}
    assert any(not np.allclose(r["fold_logits"], clean[r["case"]]) for r in shifted)  # the shifts reach the head
    stored = load_classifier(tiny_model)
    assert stored.provenance["cnn_temperature_shifted_cases"] == len(shifted)
    refit = fit_classifier([], records["validation"], stored.class_names, shifted=shifted)
    assert stored.cnn_temperature == pytest.approx(refit.cnn_temperature)


def test_validation_only_decides_the_postprocessing_again(tiny_model, tiny_env, fold_1_removed_afterwards):
    """nnU-Net's --val: a model trained before the lesion filters gets them without training again."""
    decision_file = tiny_model / "postprocessing.json"
    before = json.loads(decision_file.read_text())
    checkpoint = (tiny_model / "fold_0" / "checkpoint_final.pth").read_bytes()
    decision_file.write_text(json.dumps({"keep_largest_component": before["keep_largest_component"]}))
    # the training options need not be repeated: another optimizer than the one trained with is no obstacle
    settings = TrainSettings(final_validation_fast=True, optimizer="adamw")
    result = train(TINY_DATASET_ID, TINY_PLANS, 0, "cpu", settings, validation_only=True)
    after = json.loads(decision_file.read_text())
    assert after["lesion_filters"]["grid"] == before["lesion_filters"]["grid"]  # same weights, same decision
    assert result["metrics"]["n_cases"] == 3
    assert (tiny_model / "fold_0" / "checkpoint_final.pth").read_bytes() == checkpoint  # nothing trained
    with pytest.raises(FileNotFoundError, match="train the fold first"):
        train(TINY_DATASET_ID, TINY_PLANS, 1, "cpu", settings, validation_only=True)


def test_case_level_validation_runs_every_tenth_epoch_by_default(tiny_env):
    """The default cadence the real-scale rehearsal chose (under 10 % of a full-size GPU epoch), the first and the
    last epoch always included."""
    trainer = make_trainer(epochs=25)
    due = []
    for epoch in range(25):
        trainer.current_epoch = epoch
        if trainer.case_validation_due():
            due.append(epoch)
    assert due == [0, 10, 20, 24]


def test_train_step_leaves_patches_with_a_moved_lesion_out_of_the_subtype_loss(tiny_env):
    """The loader's ``subtype_counts`` reach the subtype loss: all patches moved, no subtype loss at all."""
    trainer = make_trainer(subtype_loss_on_lesion_patches_only=False)  # every patch counts unless moved
    batch = first_batch(trainer)
    batch["subtype_counts"] = torch.zeros(len(batch["subtype"]))
    assert float(trainer.train_step(batch)["cls_loss"]) == 0.0
    batch["subtype_counts"] = torch.ones(len(batch["subtype"]))
    assert float(trainer.train_step(batch)["cls_loss"]) > 0.0


def test_the_context_head_trains_on_the_true_gland_and_lesion(tiny_env):
    """With ``--head lesion_context`` the training step hands the head the true masks of gland and lesion (the
    network's own two-channel attention), and the head learns from them."""
    preprocessed = tiny_env["preprocessed"]
    plans = json.loads((preprocessed / f"{TINY_PLANS}.json").read_text())
    plans["plans_name"] = f"{TINY_PLANS}_context"
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["head"] = "lesion_context"
    (preprocessed / f"{plans['plans_name']}.json").write_text(json.dumps(plans))
    try:
        trainer = build_trainer(TINY_DATASET_ID, plans["plans_name"], 0, "cpu")
        apply_settings(trainer, TrainSettings())
        trainer.initialize()
        batch = first_batch(trainer)
        seen = {}
        trainer.network.register_forward_hook(lambda m, args, kwargs, out: seen.update(kwargs), with_kwargs=True)
        head_before = [p.detach().clone() for p in trainer.network.classifier.parameters()]
        trainer.network.train()
        trainer.train_step(batch)
        target = batch["target"][0]
        expected = torch.cat([(target == 1).float(), (target == 2).float()], dim=1)
        assert torch.equal(seen["lesion_mask"].cpu(), expected)
        assert any(not torch.equal(a, b) for a, b in zip(head_before, trainer.network.classifier.parameters()))
    finally:
        (preprocessed / f"{plans['plans_name']}.json").unlink()


def test_imperfect_attention_shows_the_head_a_cut_blend_of_the_true_lesion_in_training_only(tiny_env):
    """``imperfect_attention`` 1: every lesion patch's head attention differs from its true lesion and stays within
    [0, 1]; in validation the head attends to the decoder's lesion as always."""
    trainer = make_trainer(imperfect_attention=1.0)
    batch = first_batch(trainer)
    seen = []
    trainer.network.classifier.register_forward_hook(lambda m, args, out: seen.append(args[1].detach().cpu()))
    trainer.network.train()
    trainer.train_step(batch)
    true_lesion = (batch["target"][0] == 2).float()
    with_lesion = [b for b in range(len(true_lesion)) if true_lesion[b].any()]
    assert with_lesion, "the tiny loader gives lesion-centred patches"
    attention = seen[-1]
    assert attention.shape == true_lesion.shape
    assert float(attention.min()) >= 0.0 and float(attention.max()) <= 1.0 + 1e-6
    assert all(not torch.allclose(attention[b], true_lesion[b]) for b in with_lesion)
    plain = make_trainer()
    seen.clear()
    plain.network.classifier.register_forward_hook(lambda m, args, out: seen.append(args[1].detach().cpu()))
    plain.network.train()
    plain.train_step(batch)
    assert torch.equal(seen[-1], true_lesion)  # off by default: the true lesion itself


def test_imperfect_attention_share_outside_zero_to_one_is_refused_at_the_command_line(capsys):
    with pytest.raises(SystemExit) as raised:
        cli_main(["train", "1", "--imperfect-attention", "1.5"])
    assert raised.value.code == 2
    assert "share from 0 to 1" in capsys.readouterr().err


def test_every_training_option_of_the_command_line_reaches_the_settings(monkeypatch, tmp_path):
    """Each ``train`` flag lands in TrainSettings (an option parsed but not handed on is silently ignored)."""
    import nnunet_mtl.training.run as run_module

    seen = {}

    def fake_train_folds(dataset, plans, folds, device, settings, **kwargs):
        seen["settings"] = settings
        return {"model_folder": str(tmp_path)}

    monkeypatch.setattr(run_module, "train_folds", fake_train_folds)
    assert cli_main(["train", "1", "--workdir", str(tmp_path), "--imperfect-attention", "0.5",
                     "--shift-calibration", "no"]) == 0
    assert seen["settings"].imperfect_attention == 0.5
    assert seen["settings"].shift_calibration is False
