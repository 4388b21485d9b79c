"""The multi-task network: shapes, parameter counts from the modules, weight names, loading nnU-Net weights."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_mtl.model.network import MultiTaskUNet, load_segmentation_weights, parameter_counts
from nnunet_mtl.planning.plans import MTL_NETWORK_CLASS, derive_multitask_plans

REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]
COMMON = {"conv_op": "torch.nn.modules.conv.Conv3d", "conv_bias": True,
          "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
          "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
          "nonlin_kwargs": {"inplace": True}}


def plain_kwargs(features, kernels=None, strides=None) -> dict:
    n = len(features)
    return {"n_stages": n, "features_per_stage": features,
            "kernel_sizes": kernels or [[3, 3, 3]] * n, "strides": strides or [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
            "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), **COMMON}


def resenc_kwargs(features) -> dict:
    n = len(features)
    return {"n_stages": n, "features_per_stage": features, "kernel_sizes": [[3, 3, 3]] * n,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1), "n_blocks_per_stage": [1, 2, 2, 2][:n],
            "n_conv_per_stage_decoder": [1] * (n - 1), **COMMON}


def build(backbone: str, kwargs: dict, head: str = "bottleneck", deep_supervision: bool = True) -> MultiTaskUNet:
    arch = {"backbone": backbone, "num_subtypes": 3, "head": head, **kwargs}
    return get_network_from_plans(MTL_NETWORK_CLASS, arch, REQ_IMPORT, 1, 3, deep_supervision=deep_supervision)


PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def test_default_3d_network_counts_match_instantiated_modules():
    """SPEC section 4: 6 stages, 32..320 features, 3 classes: 31,196,399 U-Net parameters + 963 for the head."""
    net = build(PLAIN, plain_kwargs([32, 64, 128, 256, 320, 320]))
    counts = parameter_counts(net)
    assert counts["total"] == sum(p.numel() for p in net.parameters())
    assert counts["encoder"] + counts["decoder"] + counts["head"] == counts["total"]
    assert counts["head"] == 320 * 3 + 3 == 963
    assert counts["encoder"] == sum(p.numel() for p in net.encoder.parameters()) == 14_025_120
    reference = get_network_from_plans(PLAIN, plain_kwargs([32, 64, 128, 256, 320, 320]), REQ_IMPORT, 1, 3)
    assert counts["total"] - counts["head"] == sum(p.numel() for p in reference.parameters()) == 31_196_399
    # The trap: the decoder references the encoder, so the state dict holds the encoder twice.
    assert sum(v.numel() for v in net.state_dict().values()) > counts["total"]


def test_unet_weight_names_are_those_of_a_plain_nnunet_model():
    net = build(PLAIN, plain_kwargs([8, 16, 32]))
    reference = PlainConvUNet(1, 3, [8, 16, 32], torch.nn.Conv3d, 3, [1, 2, 2], 2, 3, 2, True,
                              torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None,
                              torch.nn.LeakyReLU, {"inplace": True}, deep_supervision=True)
    ours = {k for k in net.state_dict() if not k.startswith("classifier.")}
    assert ours == set(reference.state_dict())


@pytest.mark.parametrize("backbone, kwargs", [(PLAIN, plain_kwargs([8, 16, 32, 64])),
                                              (RESENC, resenc_kwargs([8, 16, 32, 64]))])
@pytest.mark.parametrize("head", ["bottleneck", "multiscale", "lesion_attention", "lesion_context"])
def test_forward_shapes_both_backbones(backbone, kwargs, head):
    net = build(backbone, kwargs, head)
    x = torch.randn(2, 1, 16, 32, 32)
    segmentation, logits = net(x)
    assert isinstance(segmentation, list) and segmentation[0].shape == (2, 3, 16, 32, 32)
    assert segmentation[1].shape == (2, 3, 8, 16, 16)
    assert logits.shape == (2, 3)
    net.decoder.deep_supervision = False
    segmentation, logits = net(x)
    assert segmentation.shape == (2, 3, 16, 32, 32) and logits.shape == (2, 3)
    net.return_classification = False
    assert net(x).shape == (2, 3, 16, 32, 32)
    expected_backbone = PlainConvUNet if backbone == PLAIN else ResidualEncoderUNet
    assert net._backbone_class is expected_backbone


@pytest.mark.parametrize("head", ["multiscale", "lesion_attention", "lesion_context"])
def test_gradients_reach_encoder_decoder_and_head(head):
    net = build(PLAIN, plain_kwargs([8, 16, 32]), head)
    segmentation, logits = net(torch.randn(2, 1, 16, 32, 32))
    loss = sum(s.mean() for s in segmentation) + torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2]))
    loss.backward()
    encoder_ids = {id(p) for p in net.encoder.parameters()}
    decoder_only = [p for p in net.decoder.parameters() if id(p) not in encoder_ids]
    for part, params in [("encoder", list(net.encoder.parameters())), ("decoder", decoder_only),
                         ("head", list(net.classifier.parameters()))]:
        assert params and all(p.grad is not None for p in params), part
        assert any(p.grad.abs().sum() > 0 for p in params), part


def test_lesion_attention_pools_where_the_lesion_is():
    from nnunet_mtl.model.network import LesionAttentionHead

    head = LesionAttentionHead([2, 3], num_subtypes=3, n_stages=2)
    fine = torch.zeros(1, 2, 4, 8, 8)
    fine[:, :, 2:4, 4:8, 4:8] = 5.0  # the lesion's features
    coarse = torch.ones(1, 3, 2, 4, 4)
    lesion = torch.zeros(1, 1, 4, 8, 8)
    lesion[:, :, 2:4, 4:8, 4:8] = 1.0
    captured = {}
    head.mlp.register_forward_hook(lambda m, inputs, out: captured.update(x=inputs[0]))
    image = torch.randn(1, 1, 4, 8, 8)
    image[:, :, 2:4, 4:8, 4:8] = torch.linspace(-1.0, 3.0, 32).reshape(1, 1, 2, 4, 4)  # the lesion's intensities
    head(([fine, coarse]), lesion, image)
    assert captured["x"].shape == (1, 2 + 3 + 2)  # one attended vector per stage + image mean/std, nothing global
    attended_fine = captured["x"][0, :2]
    assert torch.allclose(attended_fine, torch.full((2,), 5.0), atol=1e-3)  # pooled inside the lesion only
    inside = image[:, :, 2:4, 4:8, 4:8].flatten()
    assert torch.allclose(captured["x"][0, 5:], torch.stack([inside.mean(), inside.std(unbiased=False)]), atol=1e-3)
    head(([fine, coarse]), torch.zeros_like(lesion), image)  # no lesion predicted: uniform weights, global average
    assert torch.allclose(captured["x"][0, :2], torch.full((2,), 5.0 * 32 / 256), atol=1e-4)
    assert torch.allclose(captured["x"][0, 5], image.mean(), atol=1e-4)


def test_context_head_reads_the_gland_around_the_lesion():
    """The context head's image moments: the lesion's, and those of the gland within three voxels of it (not the
    gland far away, not fat beside the lesion), computed here independently with numpy."""
    from scipy import ndimage

    from nnunet_mtl.model.network import LesionContextHead

    head = LesionContextHead([2, 3], num_subtypes=3, n_stages=2)
    skips = [torch.zeros(1, 2, 8, 16, 16), torch.ones(1, 3, 4, 8, 8)]
    labels = np.zeros((8, 16, 16), np.int64)
    labels[1:7, 2:14, 2:9] = 1  # gland; the lesion sits at its edge, with fat (label 0) on one side
    labels[3:5, 6:9, 6:10] = 2
    image = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    image[labels == 1] += 2.0
    image[labels == 2] -= 1.0
    captured = {}
    head.mlp.register_forward_hook(lambda m, inputs, out: captured.update(x=inputs[0]))
    attention = torch.from_numpy(np.stack([labels == 1, labels == 2]).astype(np.float32))[None]
    head(skips, attention, torch.from_numpy(image)[None, None])
    lesion = labels == 2
    shell = ndimage.binary_dilation(lesion, np.ones((7, 7, 7), bool)) & ~lesion & (labels == 1)
    expected = [image[lesion].mean(), image[lesion].std(), image[shell].mean(), image[shell].std(),
                image[lesion].mean() - image[shell].mean()]
    assert captured["x"].shape == (1, 2 + 3 + 5)
    assert np.allclose(captured["x"][0, 5:].numpy(), expected, atol=1e-3)
    assert not np.isclose(image[shell].mean(), image[ndimage.binary_dilation(lesion, np.ones((7, 7, 7), bool))
                                                   & ~lesion].mean(), atol=0.1)  # fat left out changes it


def test_context_attention_from_labels_has_gland_then_lesion():
    net = build(PLAIN, plain_kwargs([8, 16, 32]), "lesion_context")
    labels = torch.tensor([0, 1, 2, 1]).reshape(1, 1, 1, 1, 4)
    attention = net.attention_from_labels(labels)
    assert attention.shape == (1, 2, 1, 1, 4) and net.attention_channels == 2
    assert attention[0, :, 0, 0].tolist() == [[0, 1, 0, 1], [0, 0, 1, 0]]
    single = build(PLAIN, plain_kwargs([8, 16, 32]), "lesion_attention").attention_from_labels(labels)
    assert single[0, 0, 0, 0].tolist() == [0, 0, 1, 0]


def test_training_attention_can_follow_the_true_lesion():
    net = build(PLAIN, plain_kwargs([8, 16, 32]), "lesion_attention").eval()
    x = torch.randn(1, 1, 16, 32, 32)
    here, there = torch.zeros(1, 1, 16, 32, 32), torch.zeros(1, 1, 16, 32, 32)
    here[..., :8, :16, :16] = 1
    there[..., 8:, 16:, 16:] = 1
    with torch.no_grad():
        _, logits_here = net(x, lesion_mask=here)
        _, logits_there = net(x, lesion_mask=there)
        _, logits_predicted = net(x)
    assert not torch.allclose(logits_here, logits_there)  # the mask, not the prediction, decides the pooling
    assert not torch.allclose(logits_here, logits_predicted)


def test_segmentation_only_nnunet_weights_load_with_only_the_head_fresh():
    kwargs = plain_kwargs([8, 16, 32])
    nnunet_model = get_network_from_plans(PLAIN, kwargs, REQ_IMPORT, 1, 3, deep_supervision=True)
    net = build(PLAIN, kwargs)
    head_before = {k: v.clone() for k, v in net.classifier.state_dict().items()}
    fresh = load_segmentation_weights(net, {f"module.{k}": v for k, v in nnunet_model.state_dict().items()})
    assert fresh and all(k.startswith("classifier.") for k in fresh)
    for key, value in nnunet_model.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    for key, value in net.classifier.state_dict().items():
        assert torch.equal(value, head_before[key])


def test_loading_weights_of_another_architecture_is_refused():
    net = build(PLAIN, plain_kwargs([8, 16, 32]))
    other = get_network_from_plans(PLAIN, plain_kwargs([8, 16, 32, 64]), REQ_IMPORT, 1, 3)
    with pytest.raises(ValueError, match="does not fit"):
        load_segmentation_weights(net, other.state_dict())


def test_derived_plans_name_our_network_and_keep_the_preprocessed_data():
    base = {"plans_name": "nnUNetPlans", "configurations": {
        "2d": {"architecture": {}},
        "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [40, 96, 112], "batch_size": 2,
                       "architecture": {"network_class_name": PLAIN, "_kw_requires_import": REQ_IMPORT,
                                        "arch_kwargs": plain_kwargs([32, 64, 128, 256, 320],
                                                                    strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2],
                                                                             [2, 2, 2], [1, 2, 2]])}}}}
    plans = derive_multitask_plans(base, ["a", "b", "c"], head="multiscale")
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["head"] == "multiscale"
    config = plans["configurations"]["3d_fullres"]
    assert plans["plans_name"] == "nnUNetPlans_MTL" and list(plans["configurations"]) == ["3d_fullres"]
    assert config["data_identifier"] == "nnUNetPlans_3d_fullres"
    assert config["architecture"]["network_class_name"] == MTL_NETWORK_CLASS
    assert config["architecture"]["arch_kwargs"]["backbone"] == PLAIN
    assert config["architecture"]["arch_kwargs"]["num_subtypes"] == 3
    demo = derive_multitask_plans(base, ["a", "b", "c"], preset="demo")["configurations"]["3d_fullres"]
    kwargs = demo["architecture"]["arch_kwargs"]
    assert kwargs["n_stages"] == 4 and kwargs["features_per_stage"] == [16, 32, 64, 128]
    assert len(kwargs["strides"]) == len(kwargs["kernel_sizes"]) == 4
    # the patch must stay divisible by the network's total stride per axis (1*1*2*2, 1*2*2*2, ...)
    assert demo["patch_size"] == [24, 48, 48]
    assert all(p % s == 0 for p, s in zip(demo["patch_size"], [4, 8, 8]))
    assert base["configurations"]["3d_fullres"]["architecture"]["network_class_name"] == PLAIN  # not mutated
    # --demo-patch: another cap, rounded down to the strides (z 30 -> 28, y 70 -> 64), never above nnU-Net's 112 in x
    wider = derive_multitask_plans(base, ["a", "b", "c"], preset="demo", demo_patch=(30, 70, 200))
    assert wider["configurations"]["3d_fullres"]["patch_size"] == [28, 64, 112]
    assert wider["multitask"]["demo_patch"] == [30, 70, 200]
    assert derive_multitask_plans(base, ["a", "b", "c"], preset="demo")["multitask"].get("demo_patch") is None
    with pytest.raises(ValueError, match="demo preset"):
        derive_multitask_plans(base, ["a", "b", "c"], demo_patch=(24, 64, 64))
    with pytest.raises(ValueError, match="three positive sizes"):
        derive_multitask_plans(base, ["a", "b", "c"], preset="demo", demo_patch=(24, 0, 64))


def test_summary_command_prints_true_counts(tmp_path):
    base = {"plans_name": "P", "dataset_name": "Dataset001_X", "original_median_spacing_after_transp": [1, 1, 1],
            "original_median_shape_after_transp": [1, 1, 1], "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "experiment_planner_used": "x",
            "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {},
            "configurations": {"3d_fullres": {
                "data_identifier": "d", "patch_size": [16, 32, 32], "batch_size": 2,
                "architecture": {"network_class_name": PLAIN, "_kw_requires_import": REQ_IMPORT,
                                 "arch_kwargs": plain_kwargs([32, 64, 128, 256, 320, 320])}}}}
    plans_file = tmp_path / "plans.json"
    plans_file.write_text(json.dumps(derive_multitask_plans(base, ["a", "b", "c"], head="bottleneck")))
    out = subprocess.run([sys.executable, "-m", "nnunet_mtl", "summary", str(plans_file)], capture_output=True,
                         text=True, check=True).stdout
    assert "14,025,120" in out and "963" in out and "31,197,362" in out


def test_training_attention_can_be_made_from_the_decoders_own():
    """``attention_from`` receives the decoder's detached lesion probability and its answer is what the head pools:
    handing back the probability gives the prediction's logits, handing back a fixed mask gives that mask's."""
    net = build(PLAIN, plain_kwargs([8, 16, 32]), "lesion_attention").eval()
    x = torch.randn(1, 1, 16, 32, 32)
    here = torch.zeros(1, 1, 16, 32, 32)
    here[..., :8, :16, :16] = 1
    seen = {}

    def keep(predicted):
        seen["predicted"] = predicted
        return predicted

    with torch.no_grad():
        segmentation, logits_predicted = net(x)
        _, logits_kept = net(x, attention_from=keep)
        _, logits_here = net(x, lesion_mask=here)
        _, logits_made = net(x, attention_from=lambda predicted: here)
    expected = torch.softmax(segmentation[0].float(), dim=1)[:, -1:]
    assert torch.allclose(seen["predicted"], expected, atol=1e-6)
    assert torch.allclose(logits_kept, logits_predicted, atol=1e-6)
    assert torch.allclose(logits_made, logits_here, atol=1e-6)
