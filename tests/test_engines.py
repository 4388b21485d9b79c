"""Inference engines: every engine and precision against torch fp32, export cache, refusals, auto choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_mtl.cli import main as cli_main
from nnunet_mtl.inference import engines
from nnunet_mtl.inference.engines import EngineUnavailable, check_engine, make_engine, weights_key
from nnunet_mtl.inference.outputs import read_probability_table
from nnunet_mtl.inference.predict import PredictionMode, load_predictor, predict_folder

CPU = torch.device("cpu")
# (engine, precision) pairs the README offers; bf16 needs a CPU with native bfloat16, else it must be refused
OFFERED = [("torch", "bf16"), ("openvino", "fp32"), ("openvino", "bf16"), ("onnxruntime", "fp32")]
FP32_TOLERANCE = {"dice": 0.999, "probability": 1e-3}
BF16_TOLERANCE = {"dice": 0.95, "probability": 0.05}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if not a.any() and not b.any() else 2 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def torch_reference(tiny_model, tiny_test_crops, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    report = predict_folder(tiny_model, tiny_test_crops, out, device=CPU,
                            mode=PredictionMode.fast(), progress=False)
    assert not report.failed
    return out


@pytest.mark.parametrize(("engine", "precision"), OFFERED)
def test_every_engine_predicts_what_torch_fp32_predicts(engine, precision, tiny_model, tiny_test_crops,
                                                        torch_reference, tmp_path):
    images = tiny_test_crops
    mode = PredictionMode.fast(engine=engine, precision=precision)
    if precision == "bf16" and not engines.cpu_has_fast_bf16():
        with pytest.raises(EngineUnavailable, match="natively"):
            predict_folder(tiny_model, images, tmp_path / "out", device=CPU, mode=mode, progress=False)
        return
    report = predict_folder(tiny_model, images, tmp_path / "out", device=CPU, mode=mode, progress=False)
    assert not report.failed and len(report.predicted) == 3
    tolerance = FP32_TOLERANCE if precision == "fp32" else BF16_TOLERANCE
    reference_p = read_probability_table(torch_reference)
    probabilities = read_probability_table(tmp_path / "out")
    for image in sorted(images.glob("*_0000.nii.gz")):
        case = image.name.removesuffix("_0000.nii.gz")
        mine = sitk.ReadImage(str(tmp_path / "out" / f"{case}.nii.gz"))
        reference = sitk.ReadImage(str(torch_reference / f"{case}.nii.gz"))
        source = sitk.ReadImage(str(image))
        assert mine.GetSize() == source.GetSize() and np.allclose(mine.GetSpacing(), source.GetSpacing())
        assert np.allclose(mine.GetOrigin(), source.GetOrigin())
        assert np.allclose(mine.GetDirection(), source.GetDirection())
        a, b = sitk.GetArrayFromImage(mine), sitk.GetArrayFromImage(reference)
        for label in (1, 2):
            assert dice(a == label, b == label) >= tolerance["dice"], (case, label)
        assert np.abs(probabilities[case] - reference_p[case]).max() <= tolerance["probability"]
    if engine != "torch":  # the whole network ran in the engine: its exports are in the model folder
        assert list((tiny_model / "engine_cache").glob("network-*.onnx"))
        assert list((tiny_model / "engine_cache").glob("classify-*.onnx"))


@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
def test_exports_are_keyed_by_the_weights_and_reused(engine, tiny_model, tmp_path):
    predictor = load_predictor(tiny_model, device=CPU)
    network = predictor.network.eval()
    parameters = predictor.list_of_parameters[0]
    runner = make_engine(engine, "fp32", cache_dir=tmp_path)
    runner.bind(network, weights_key(parameters))
    x = torch.randn(1, 1, *predictor.configuration_manager.patch_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        segmentation, logits = runner.forward(x)
        expected_segmentation, expected_logits = network(x)
    assert torch.allclose(segmentation, expected_segmentation, atol=1e-3)
    assert torch.allclose(logits, expected_logits, atol=1e-4)
    first = sorted(tmp_path.iterdir())
    assert [p.name.split("-")[0] for p in first] == ["network"]  # no temporary file left behind
    again = make_engine(engine, "fp32", cache_dir=tmp_path)  # a new process would find the same file
    again.bind(network, weights_key(parameters))
    with torch.inference_mode():
        again.forward(x)
    assert again.export_seconds == 0.0 and sorted(tmp_path.iterdir()) == first
    changed = {k: v.clone() for k, v in parameters.items()}  # another checkpoint: another export
    name = next(k for k in changed if k.startswith("decoder.seg_layers"))
    changed[name] += 0.5
    network.load_state_dict(changed)
    try:
        again.bind(network, weights_key(changed))
        with torch.inference_mode():
            other_segmentation, _ = again.forward(x)
            assert torch.allclose(other_segmentation, network(x)[0], atol=1e-3)
    finally:
        network.load_state_dict(parameters)
    assert len(list(tmp_path.glob("network-*.onnx"))) == 2


def test_an_ensemble_exports_each_folds_parameters(tiny_model, tiny_dataset):
    """Two folds (the second with other weights): one export per fold, and the same ensemble as torch's."""
    data = torch.from_numpy(np.asarray(_preprocessed_case(tiny_model, tiny_dataset)))
    results = {}
    for engine in ("torch", "onnxruntime"):
        predictor = load_predictor(tiny_model, device=CPU, mode=PredictionMode.fast(engine=engine))
        first = predictor.list_of_parameters[0]
        second = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
                  if v.is_floating_point() else v for k, v in first.items()}
        predictor.list_of_parameters = [first, second]
        results[engine] = (predictor.predict_logits_from_preprocessed_data(data), predictor.last_subtype_probabilities)
        if engine == "onnxruntime":
            assert sorted(predictor._weights_keys) == [0, 1]
            assert set(predictor._weights_keys.values()) == {weights_key(first), weights_key(second)}
            assert set(predictor.engine.compiled) == {weights_key(first), weights_key(second)}
    torch_logits, onnx_logits = results["torch"][0].float(), results["onnxruntime"][0].float()
    # nnU-Net's sliding window sums Gaussian-weighted tiles in float16 and divides by the weights, which are tiny
    # at the crop's border: a few voxels there differ by float16 rounding magnified (measured: 0.017 at most)
    difference = (torch_logits - onnx_logits).abs()
    assert difference.mean() < 1e-4 and (difference > 1e-2).float().mean() < 1e-4
    assert (torch_logits.argmax(0) == onnx_logits.argmax(0)).float().mean() >= 0.999
    assert np.allclose(results["torch"][1], results["onnxruntime"][1], atol=1e-4)


def _preprocessed_case(model: Path, dataset: dict) -> np.ndarray:
    predictor = load_predictor(model, device=CPU)
    pm, cm = predictor.plans_manager, predictor.configuration_manager
    image = sorted((dataset["phantom"] / "test").glob("*_0000.nii.gz"))[0]
    data, _, _ = cm.preprocessor_class(verbose=False).run_case([str(image)], None, pm, cm, predictor.dataset_json)
    return data


def test_engines_that_cannot_run_are_refused_by_name(monkeypatch):
    real_find_spec = engines.importlib.util.find_spec
    monkeypatch.setattr(engines.importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real_find_spec(name, *a))
    with pytest.raises(EngineUnavailable, match="'openvino' is not installed"):
        check_engine("openvino", "fp32", CPU)
    assert "openvino" not in engines.installed_engines()
    monkeypatch.undo()
    with pytest.raises(EngineUnavailable, match="unknown engine 'tensorrt'"):
        check_engine("tensorrt", "fp32", CPU)
    with pytest.raises(EngineUnavailable, match="'onnxruntime' runs fp32 only"):
        check_engine("onnxruntime", "bf16", CPU)
    with pytest.raises(EngineUnavailable, match="runs on the CPU only"):
        check_engine("openvino", "fp32", torch.device("cuda"))
    monkeypatch.setattr(engines, "cpu_has_fast_bf16", lambda: False)
    for engine in ("torch", "openvino", "auto"):
        with pytest.raises(EngineUnavailable, match="natively"):
            check_engine(engine, "bf16", CPU)
    check_engine("torch", "fp32", CPU)  # always available
    monkeypatch.setattr(engines, "cpu_has_fast_bf16", lambda: True)
    check_engine("torch", "bf16", CPU)  # a CPU with native bfloat16 runs it
    with pytest.raises(EngineUnavailable, match="'onnxruntime' runs fp32 only"):
        check_engine("onnxruntime", "bf16", CPU)


def test_predict_refuses_a_missing_engine_before_any_work(tiny_model, tiny_dataset, tmp_path, monkeypatch, capsys):
    real_find_spec = engines.importlib.util.find_spec
    monkeypatch.setattr(engines.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    out = tmp_path / "out"
    code = cli_main(["predict", "-i", str(tiny_dataset["phantom"] / "test"), "-o", str(out), "-m", str(tiny_model),
                     "--fast", "--engine", "onnxruntime", "--device", "cpu"])
    assert code == 2
    assert "'onnxruntime' is not installed" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


def test_auto_measures_once_and_the_model_folder_remembers(tiny_model, tmp_path, monkeypatch):
    predictor = load_predictor(tiny_model, device=CPU)
    network, parameters = predictor.network, predictor.list_of_parameters[0]
    patch = tuple(predictor.configuration_manager.patch_size)
    logged = []
    chosen = engines.choose_engine(network, weights_key(parameters), patch, "fp32", tmp_path, log=logged.append)
    assert chosen in engines.installed_engines()
    record = json.loads((tmp_path / engines.AUTO_CHOICE_FILE).read_text())
    (entry,) = record.values()
    measured = entry["measured"]
    assert set(measured) == set(engines.installed_engines())
    fit = [n for n, row in measured.items() if engines._equal_accuracy(row, measured["torch"])]
    assert chosen == min(fit, key=lambda n: measured[n]["seconds"])  # the fastest at equal accuracy
    assert measured["torch"]["label_agreement"] == 1.0 and measured["torch"]["probability_difference"] == 0.0

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(engines, "measure_engines", no_measuring)
    assert engines.choose_engine(network, weights_key(parameters), patch, "fp32", tmp_path, log=logged.append) \
        == chosen
    other = {k: v + 1.0 if k.startswith("decoder.seg_layers") else v for k, v in parameters.items()}
    with pytest.raises(AssertionError, match="measured again"):  # other weights: measured anew
        engines.choose_engine(network, weights_key(other), patch, "fp32", tmp_path, log=logged.append)


def test_an_engine_that_disagrees_is_not_chosen():
    baseline = {"seconds": 1.0, "label_agreement": 1.0, "probability_difference": 0.0}
    assert engines._equal_accuracy({"seconds": 0.5, "label_agreement": 0.9995, "probability_difference": 0.002},
                                   baseline)
    assert not engines._equal_accuracy({"seconds": 0.1, "label_agreement": 0.98, "probability_difference": 0.0},
                                       baseline)
    assert not engines._equal_accuracy({"seconds": 0.1, "label_agreement": 1.0, "probability_difference": 0.2},
                                       baseline)
    assert not engines._equal_accuracy({"refused": "not installed"}, baseline)


def test_weights_key_follows_the_values_not_the_objects():
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(2)}
    b = {"b": torch.zeros(2), "w": torch.arange(6, dtype=torch.float32).reshape(2, 3).clone()}
    assert weights_key(a) == weights_key(b)
    b["w"][0, 0] = 1e-6
    assert weights_key(a) != weights_key(b)
    assert weights_key({"w": a["w"].reshape(3, 2)}) != weights_key({"w": a["w"]})


def test_a_read_only_model_folder_exports_to_the_user_cache(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    assert engines.engine_cache_dir(model) == model / engines.CACHE_FOLDER
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(engines.os, "access", lambda path, mode: False)
    folder = engines.engine_cache_dir(model)
    assert folder.is_relative_to(tmp_path / "cache" / "nnunet-mtl") and folder != engines.engine_cache_dir(tmp_path)


# ------------------------------------------------------------------------------------------ the network's side
def _network(head: str, backbone: str = "plain"):
    from test_model import PLAIN, RESENC, build, plain_kwargs, resenc_kwargs

    anisotropic = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    if backbone == "plain":
        return build(PLAIN, plain_kwargs([4, 8, 16], strides=anisotropic), head=head, deep_supervision=False)
    return build(RESENC, resenc_kwargs([4, 8, 16]), head=head, deep_supervision=False)


def test_stride_pooling_equals_adaptive_pooling():
    """The attention head pools by each stage's stride (exportable with free axes): the same numbers as the
    adaptive pooling it replaced, for the anisotropic strides nnU-Net plans."""
    from nnunet_mtl.model.network import _pool_to

    network = _network("lesion_attention")
    assert network.classifier.stage_strides == [(1, 1, 1), (1, 2, 2), (2, 4, 4)]
    assert _network("lesion_attention", "resenc").classifier.stage_strides == [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    weights = torch.rand(2, 1, 8, 16, 24, generator=torch.Generator().manual_seed(0))
    for factor in network.classifier.stage_strides:
        size = torch.Size(s // f for s, f in zip(weights.shape[2:], factor))
        expected = torch.nn.functional.adaptive_avg_pool3d(weights, size)
        assert torch.allclose(_pool_to(weights, size, factor), expected, atol=1e-6)
    # sizes that do not divide fall back to adaptive pooling
    odd = torch.Size((3, 5, 7))
    assert torch.equal(_pool_to(weights, odd, (2, 4, 4)), torch.nn.functional.adaptive_avg_pool3d(weights, odd))


@pytest.mark.parametrize("head", ["lesion_attention", "lesion_context", "bottleneck", "multiscale"])
def test_classify_is_the_forward_passs_head(head):
    """encoder + head on a tile, given the decoder's lesion probability, gives the forward pass's subtype logits."""
    network = _network(head).eval()
    x = torch.randn(2, 1, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    attends = head in ("lesion_attention", "lesion_context")
    with torch.inference_mode():
        segmentation, logits = network(x)
        probabilities = torch.softmax(segmentation, 1)
        attention = network.attention_from_probabilities(probabilities) if attends else None
        if attends:  # the lesion last; the context head also gets the gland (class 1) before it
            expected = probabilities[:, 1:] if head == "lesion_context" else probabilities[:, 2:]
            assert torch.equal(attention, expected)
        assert torch.allclose(network.classify(x, attention), logits, atol=1e-6)
    if attends:
        with pytest.raises(ValueError, match="lesion probability"):
            network.classify(x)


def test_the_context_heads_export_takes_gland_and_lesion(tmp_path):
    """The exported encoder + context head (ONNX Runtime) takes the two-channel attention and gives torch's
    logits; the gland channel changes them (it is not ignored on the way through the export)."""
    network = _network("lesion_context").eval()
    engine = make_engine("onnxruntime", "fp32", CPU, cache_dir=tmp_path)
    engine.bind(network, weights_key(network.state_dict()))
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, 8, 32, 32, generator=generator)
    attention = torch.zeros(1, 2, 8, 32, 32)
    attention[:, 0, 2:6, 8:24, 8:24] = 1.0  # gland
    attention[:, 1, 3:5, 12:18, 12:18] = 1.0  # lesion inside it
    attention[:, 0][attention[:, 1] > 0] = 0.0
    exported = engine.classify(x, attention)
    with torch.inference_mode():
        assert torch.allclose(exported, network.classify(x, attention), atol=1e-4)
    no_gland = attention.clone()
    no_gland[:, 0] = 0.0
    assert not torch.allclose(exported, engine.classify(x, no_gland), atol=1e-4)


def test_a_loaded_predictor_classifies_the_same_tile_twice_alike(tiny_model):
    """The head has dropout: a predictor that classified before any crop pass (the network still in training
    mode) gave two different answers for one tile."""
    predictor = load_predictor(tiny_model, device=CPU)
    predictor._bind_engine()
    generator = torch.Generator().manual_seed(0)
    tile = torch.randn(1, 1, *predictor.configuration_manager.patch_size, generator=generator)
    attention = torch.rand(1, 1, *predictor.configuration_manager.patch_size, generator=generator)
    with torch.no_grad():
        first, second = (predictor.engine.classify(tile, attention) for _ in range(2))
    assert not predictor.network.training
    assert torch.equal(first, second)
