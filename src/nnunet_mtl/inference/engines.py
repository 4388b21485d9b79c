"""Inference engines: what runs the network's forward pass for the predictor (everything else stays nnU-Net's).

- ``torch``: the network itself, fp32, or bf16 under torch's CPU autocast (the baseline).
- ``openvino``: the whole :class:`~nnunet_mtl.model.network.MultiTaskUNet` (segmentation and subtype head, both
  outputs) exported to ONNX once and compiled by OpenVINO for this CPU; bf16 through OpenVINO's
  ``INFERENCE_PRECISION_HINT``.
- ``onnxruntime``: the same ONNX file in an ONNX Runtime CPU session (fp32; its CPU provider computes no bf16
  convolutions).
- ``auto`` (:func:`choose_engine`): the fastest installed engine that runs at equal accuracy on this CPU, measured
  once on one patch and cached in the model folder.

An engine that is not installed, or a precision this CPU does not compute natively, is refused by name
(:class:`EngineUnavailable`), never swapped for another silently.

Exports are ONNX files with free spatial axes in ``<model folder>/engine_cache/``, named by a hash of the weights
(each fold's parameters, so an ensemble gets one export per fold and a new checkpoint never reuses a stale export),
the network's structure, the outputs and the torch version; written under a temporary name and renamed. The
legacy TorchScript exporter (``torch.onnx.export(dynamo=False)``) is used: on the tiny test network it exported in
11 s where the dynamo exporter took 220 s, with the same outputs (max difference 1e-5); OpenVINO reads the ONNX
file directly (``Core.read_model``), and its ``convert_model`` from the torch module took 50 s.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import tempfile
import time
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnunet_mtl.hardware import cpu_has_fast_bf16

ENGINES = ("torch", "openvino", "onnxruntime")
ENGINE_CHOICES = (*ENGINES, "auto")
PRECISIONS = ("fp32", "bf16")
EXPORT_FORMAT = 1  # bump when what is exported changes, so old exports are not reused
ONNX_OPSET = 17
CACHE_FOLDER = "engine_cache"
AUTO_CHOICE_FILE = "auto_engine.json"
_PACKAGES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}


class EngineUnavailable(ValueError):
    """An engine or precision that cannot run here; the message names it and says why."""


# ----------------------------------------------------------------------------------------------- availability
def installed_engines() -> list[str]:
    return ["torch", *(e for e, module in _PACKAGES.items() if importlib.util.find_spec(module) is not None)]


def check_engine(engine: str, precision: str, device: torch.device) -> None:
    """Raise :class:`EngineUnavailable` naming what cannot run: unknown, not installed, wrong device, precision."""
    if engine not in ENGINE_CHOICES:
        raise EngineUnavailable(f"unknown engine {engine!r}; choose one of {', '.join(ENGINE_CHOICES)}")
    if precision not in PRECISIONS:
        raise EngineUnavailable(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if engine in _PACKAGES and importlib.util.find_spec(_PACKAGES[engine]) is None:
        raise EngineUnavailable(f"engine {engine!r} is not installed (pip install {_PACKAGES[engine]}); "
                                f"installed: {', '.join(installed_engines())}")
    if device.type != "cpu":
        if engine not in ("torch", "auto"):
            raise EngineUnavailable(f"engine {engine!r} runs on the CPU only; on {device.type} use --engine torch")
        if precision != "fp32":
            raise EngineUnavailable(f"--precision {precision} is for CPU prediction; on {device.type} nnU-Net's "
                                    "own mixed precision runs (--precision fp32)")
        return
    # what the engine can never do is said before what this CPU cannot do, so the message is the same anywhere
    if precision == "bf16" and engine == "onnxruntime":
        raise EngineUnavailable("engine 'onnxruntime' runs fp32 only (its CPU provider computes no bfloat16 "
                                "convolutions): use --precision fp32, or --engine openvino / torch for bf16")
    if precision == "bf16" and not cpu_has_fast_bf16():
        raise EngineUnavailable("--precision bf16 needs a CPU that computes bfloat16 natively (AVX512-BF16 or "
                                "AMX); this one would emulate it, slower than fp32: use --precision fp32")


# ---------------------------------------------------------------------------------------------------- keys
def weights_key(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash of the parameter values (names, dtypes, shapes, bytes): the same weights give the same key whatever
    file they came from, and any other checkpoint another key."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:20]


def _export_key(network: nn.Module, weights: str, kind: str) -> str:
    identity = json.dumps([EXPORT_FORMAT, ONNX_OPSET, torch.__version__, weights, kind, repr(network),
                           bool(getattr(network, "return_classification", True))])
    return hashlib.sha256(identity.encode()).hexdigest()[:20]


def _stride(network: nn.Module) -> np.ndarray | None:
    strides = getattr(getattr(network, "encoder", None), "strides", None)
    return None if strides is None else np.prod(np.array(strides, dtype=int), axis=0)


# ----------------------------------------------------------------------------------------------------- engines
class Engine:
    """Runs the network's forward for the predictor: ``forward`` (segmentation and subtype logits) and
    ``classify`` (encoder and head only, on a tile whose lesion probability is known).

    ``bind`` names the network and its weights before a case (or a fold of an ensemble) is predicted; exported
    engines look up or export the graph for those weights.
    """

    name = "torch"
    exported = False  # True: needs a weights key in bind()

    def __init__(self, precision: str = "fp32"):
        self.precision = precision
        self.network: nn.Module | None = None

    def bind(self, network: nn.Module, weights: str | None = None) -> None:
        self.network = network

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def classify(self, x: torch.Tensor, lesion_probability: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} {self.precision}"


class TorchEngine(Engine):
    """The network in eager torch; bf16 = torch's CPU autocast (the head stays fp32 inside the network)."""

    def _autocast(self, x: torch.Tensor):
        if self.precision == "bf16":
            return torch.autocast(x.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self._autocast(x):
            output = self.network(x)
        segmentation, logits = output if isinstance(output, tuple) else (output, None)
        return segmentation.float(), logits

    def classify(self, x: torch.Tensor, lesion_probability: torch.Tensor | None) -> torch.Tensor:
        network = self.network
        while not hasattr(network, "classify") and hasattr(network, "module"):
            network = network.module  # the trainer's network under DDP (torch.compile forwards attributes itself)
        with self._autocast(x):
            return network.classify(x, lesion_probability).float()


class _Classify(nn.Module):
    """The network's encoder and head as a module of their own, for export."""

    def __init__(self, network: nn.Module, with_lesion: bool):
        super().__init__()
        self.network = network
        self.with_lesion = with_lesion

    def forward(self, x: torch.Tensor, lesion_probability: torch.Tensor | None = None) -> torch.Tensor:
        return self.network.classify(x, lesion_probability if self.with_lesion else None)


def _array(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().float().cpu().numpy())  # channels-last tensors come strided


class ExportedEngine(Engine):
    """An engine that runs the network exported to ONNX; subclasses load the file through their own API."""

    exported = True
    keep_compiled = 3  # compiled graphs kept per weights (each fold's): the patch, the classifier, a crop shape

    def __init__(self, precision: str = "fp32", cache_dir: Path | None = None, threads: int | None = None):
        super().__init__(precision)
        self._scratch = None
        if cache_dir is None:  # no model folder (training-time validation): exports live as long as the engine
            self._scratch = tempfile.TemporaryDirectory(prefix="nnunet_mtl_engine_")
            cache_dir = Path(self._scratch.name)
        self.cache_dir = Path(cache_dir)
        self.threads = threads or torch.get_num_threads()
        self.weights: str | None = None
        self.compiled: dict[str, OrderedDict[tuple, object]] = {}  # weights -> (kind, shape) -> runner
        self.export_seconds = 0.0

    def bind(self, network: nn.Module, weights: str | None = None) -> None:
        if weights is None:
            raise ValueError(f"engine {self.name} needs the weights' key to find its export")
        self.network, self.weights = network, weights

    # -- export
    def onnx_file(self, kind: str) -> Path:
        """The cached export of the bound weights (``network`` or ``classify``), written on first use."""
        path = self.cache_dir / f"{kind}-{_export_key(self.network, self.weights, kind)}.onnx"
        if not path.is_file():
            start = time.perf_counter()
            self._export(kind, path)
            self.export_seconds += time.perf_counter() - start
        return path

    def _export(self, kind: str, path: Path) -> None:
        network = self.network
        was_training = network.training
        network.eval()
        parameter = next(network.parameters())
        stride = _stride(network)
        # twice the stride: the smallest input whose every stage keeps more than one voxel (the axes stay free)
        shape = [2 * int(s) for s in (stride if stride is not None else (8, 8, 8))]
        x = torch.randn(1, network.input_channels, *shape, dtype=parameter.dtype, device=parameter.device)
        axes = {0: "batch", **{2 + i: f"axis{i}" for i in range(len(shape))}}
        if kind == "network":
            module, inputs, names = network, (x,), ["image"]
            outputs = ["segmentation", "subtype_logits"] if getattr(network, "return_classification", True) \
                else ["segmentation"]
            dynamic = {"image": axes, "segmentation": axes}
        else:
            with_lesion = getattr(network, "attends", False)
            module = _Classify(network, with_lesion)
            attention = torch.rand(1, getattr(network, "attention_channels", 1), *shape, dtype=x.dtype,
                                   device=x.device)
            inputs = (x, attention) if with_lesion else (x,)
            names = ["image", "lesion_probability"] if with_lesion else ["image"]
            outputs, dynamic = ["subtype_logits"], {n: axes for n in names}
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.onnx")
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # tracer warnings about shape checks frozen at export
                torch.onnx.export(module, inputs, str(tmp), input_names=names, output_names=outputs,
                                  dynamic_axes=dynamic, opset_version=ONNX_OPSET, dynamo=False)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
            network.train(was_training)

    # -- running
    def _check_shape(self, x: torch.Tensor) -> None:
        stride = _stride(self.network)
        if stride is not None and any(s % int(d) for s, d in zip(x.shape[2:], stride)):
            raise ValueError(f"engine {self.name}: input {tuple(x.shape[2:])} is not a multiple of the network's "
                             f"stride {tuple(int(d) for d in stride)} (the predictor pads to it)")

    def _get(self, kind: str, shape: tuple[int, ...]):
        compiled = self.compiled.setdefault(self.weights, OrderedDict())
        key = (kind, self._shape_key(shape))
        if key in compiled:
            compiled.move_to_end(key)
            return compiled[key]
        runner = self._load(self.onnx_file(kind), shape)
        compiled[key] = runner
        while len(compiled) > self.keep_compiled:
            compiled.popitem(last=False)
        return runner

    def _shape_key(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def _load(self, onnx_file: Path, shape: tuple[int, ...]):
        raise NotImplementedError

    def _run(self, runner, inputs: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check_shape(x)
        outputs = self._run(self._get("network", tuple(x.shape)), [_array(x)])
        segmentation = torch.from_numpy(outputs[0]).to(x.device)
        return segmentation, (torch.from_numpy(outputs[1]).to(x.device) if len(outputs) > 1 else None)

    def classify(self, x: torch.Tensor, lesion_probability: torch.Tensor | None) -> torch.Tensor:
        self._check_shape(x)
        inputs = [_array(x)]
        if getattr(self.network, "attends", False):
            inputs.append(_array(lesion_probability))
        return torch.from_numpy(self._run(self._get("classify", tuple(x.shape)), inputs)[0]).to(x.device)


class OpenVINOEngine(ExportedEngine):
    """OpenVINO's CPU plugin. ``static_shapes``: each input shape compiled on its own; else one compiled model with
    free spatial axes serves every shape."""

    name = "openvino"
    static_shapes = False

    def __init__(self, precision: str = "fp32", cache_dir: Path | None = None, threads: int | None = None):
        super().__init__(precision, cache_dir, threads)
        import openvino

        self.core = openvino.Core()
        # explicit f32: on CPUs with AMX OpenVINO would otherwise pick bf16 by itself
        self.config = {"INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
                       "INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"}

    def _shape_key(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape if self.static_shapes else ()

    def _load(self, onnx_file: Path, shape: tuple[int, ...]):
        model = self.core.read_model(str(onnx_file))
        if self.static_shapes:
            lesion = {model.inputs[1].any_name: [shape[0], 1, *shape[2:]]} if len(model.inputs) > 1 else {}
            model.reshape({model.inputs[0].any_name: list(shape), **lesion})
        return self.core.compile_model(model, "CPU", self.config).create_infer_request()

    def _run(self, request, inputs: list[np.ndarray]) -> list[np.ndarray]:
        request.infer(inputs)
        return [np.array(request.get_output_tensor(i).data) for i in range(len(request.model_outputs))]


class OnnxRuntimeEngine(ExportedEngine):
    """ONNX Runtime's CPU execution provider; free spatial axes, one session per export."""

    name = "onnxruntime"

    def _shape_key(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return ()  # one session serves every shape

    def _load(self, onnx_file: Path, shape: tuple[int, ...]):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        return onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])

    def _run(self, session, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return session.run(None, {i.name: a for i, a in zip(session.get_inputs(), inputs)})


ENGINE_CLASSES = {"torch": TorchEngine, "openvino": OpenVINOEngine, "onnxruntime": OnnxRuntimeEngine}


CPU = torch.device("cpu")


def make_engine(engine: str, precision: str = "fp32", device: torch.device = CPU,
                cache_dir: Path | None = None) -> Engine:
    """One named engine (not ``auto``: see :func:`choose_engine`), refused with the reason if it cannot run."""
    check_engine(engine, precision, device)
    if engine == "auto":
        raise ValueError("make_engine takes a named engine; 'auto' is resolved by choose_engine")
    if engine == "torch":
        return TorchEngine(precision)
    return ENGINE_CLASSES[engine](precision, cache_dir)


def engine_cache_dir(model_dir: Path) -> Path:
    """``<model folder>/engine_cache``; a per-user cache folder when the model folder is read-only (a shared model
    store), named after the model folder's path."""
    folder = Path(model_dir) / CACHE_FOLDER
    if os.access(folder if folder.is_dir() else Path(model_dir), os.W_OK):
        return folder
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nnunet-mtl" / CACHE_FOLDER
    return base / hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:16]


# -------------------------------------------------------------------------------------------------------- auto
def _machine() -> str:
    """What the choice depends on besides the model: the CPU, its thread count, the engines' versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {e: (torch.__version__ if e == "torch" else importlib.metadata.version(_PACKAGES[e]))
                for e in installed_engines()}
    return json.dumps([cpu, cpu_has_fast_bf16(), torch.get_num_threads(), versions])


def measure_engines(network: nn.Module, weights: str, patch_size: tuple[int, ...], precision: str,
                    cache_dir: Path | None, repeats: int = 2, seed: int = 0) -> dict[str, dict]:
    """Seconds per patch and agreement with torch fp32 of every installed engine at ``precision`` (and of torch
    at that precision, the baseline for bf16), on one seeded patch of noise."""
    network.eval()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, network.input_channels, *patch_size, generator=generator)
    reference = TorchEngine("fp32")
    reference.bind(network)
    with torch.inference_mode():
        ref_seg, ref_logits = reference.forward(x)
    ref_labels = ref_seg.argmax(1)
    ref_probabilities = torch.softmax(ref_logits, 1) if ref_logits is not None else None
    results = {}
    for name in installed_engines():
        try:
            check_engine(name, precision, CPU)
        except EngineUnavailable as e:
            results[name] = {"refused": str(e)}
            continue
        engine = make_engine(name, precision, cache_dir=cache_dir)
        engine.bind(network, weights)
        with torch.inference_mode():
            engine.forward(x)  # export, compile, warm up
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                segmentation, logits = engine.forward(x)
                seconds.append(time.perf_counter() - start)
        row = {"seconds": min(seconds),
               "label_agreement": float((segmentation.argmax(1) == ref_labels).float().mean())}
        if ref_probabilities is not None and logits is not None:
            row["probability_difference"] = float((torch.softmax(logits, 1) - ref_probabilities).abs().max())
        results[name] = row
    return results


def _equal_accuracy(row: dict, baseline: dict) -> bool:
    """As accurate as torch at the same precision: label agreement with torch fp32 no more than 0.1 % lower,
    subtype probabilities no more than 0.01 further off."""
    if "seconds" not in row:
        return False
    agree = row["label_agreement"] >= min(baseline["label_agreement"], 1.0) - 1e-3
    close = row.get("probability_difference", 0.0) <= baseline.get("probability_difference", 0.0) + 0.01
    return agree and close


def choose_engine(network: nn.Module, weights: str, patch_size: tuple[int, ...], precision: str,
                  cache_dir: Path | None, log=print) -> str:
    """The fastest engine at equal accuracy (:func:`_equal_accuracy`), measured once and cached in the model
    folder (``engine_cache/auto_engine.json``, keyed by the weights, patch, precision, CPU and versions)."""
    check_engine("auto", precision, CPU)
    key = hashlib.sha256(json.dumps([_machine(), weights, list(patch_size), precision]).encode()).hexdigest()[:20]
    choices = {}
    choice_file = cache_dir / AUTO_CHOICE_FILE if cache_dir is not None else None
    if choice_file is not None and choice_file.is_file():
        try:
            choices = json.loads(choice_file.read_text())
        except (OSError, ValueError):
            choices = {}
        if key in choices:
            return choices[key]["engine"]
    log(f"engine auto: measuring the installed engines at {precision} on one {tuple(patch_size)} patch "
        "(once per model and machine)")
    results = measure_engines(network, weights, tuple(patch_size), precision, cache_dir)
    baseline = results["torch"]
    fit = {name: row for name, row in results.items() if _equal_accuracy(row, baseline)}
    chosen = min(fit, key=lambda name: fit[name]["seconds"])
    summary = ", ".join(f"{n} {r['seconds']:.2f} s" if "seconds" in r else f"{n} refused"
                        for n, r in results.items())
    log(f"engine auto: {chosen} ({summary})")
    if choice_file is not None:
        choices[key] = {"engine": chosen, "precision": precision, "measured": results}
        choice_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = choice_file.with_name(f".{choice_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(choices, indent=1))
        os.replace(tmp, choice_file)
    return chosen
