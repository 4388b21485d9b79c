"""The network alone, per engine and precision: seconds per forward pass, measured side by side in one run.

For one input (a preprocessed case of the model's test images cut or padded to the shape, or noise), every variant
runs the whole network (segmentation and subtype head) and the encoder-and-head pass that classifies the lesion
patch; rounds alternate the variants. Prints the first call (export and compile included), the best of the rounds,
the ratio to torch fp32, and the agreement with torch fp32 (share of voxels with the same label, largest subtype
probability difference). Also prices torch's own levers (channels-last, torch.compile) when asked.

  python bench/engine_speed.py --model MODEL --image CASE_0000.nii.gz [--shape 64 160 192] [--rounds 3]
  python bench/engine_speed.py --model MODEL --variants torch:fp32 openvino:bf16 --shape 128 320 320
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

VARIANTS = ("torch:fp32", "torch:bf16", "openvino:fp32", "openvino:bf16", "onnxruntime:fp32")
TORCH_LEVERS = ("torch-channels-last:fp32", "torch-compile:fp32", "torch-compile:bf16")
SHAPE_POLICIES = ("openvino-static:fp32", "openvino-static:bf16")  # a compiled model per input shape


def input_tensor(predictor, image: Path | None, shape: tuple[int, ...], seed: int = 0):
    """The preprocessed case, centre-cut or zero-padded to ``shape``; seeded noise without an image."""
    import numpy as np
    import torch
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    if image is None:
        return torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(seed))
    pm, cm = predictor.plans_manager, predictor.configuration_manager
    data, _, _ = cm.preprocessor_class(verbose=False).run_case([str(image)], None, pm, cm, predictor.dataset_json)
    data = torch.from_numpy(np.asarray(data, dtype=np.float32))
    start = [max((s - t) // 2, 0) for s, t in zip(data.shape[1:], shape)]
    data = data[(slice(None), *(slice(a, a + t) for a, t in zip(start, shape)))]
    return pad_nd_image(data, list(shape))[None].contiguous()


def make_variant(name: str, predictor, model: Path):
    import torch

    from nnunet_mtl.inference.engines import TorchEngine, engine_cache_dir, make_engine, weights_key

    engine_name, precision = name.split(":")
    network = predictor.network
    weights = weights_key(predictor.list_of_parameters[0])
    if engine_name == "torch-channels-last":
        engine = TorchEngine(precision)
        engine.bind(network.to(memory_format=torch.channels_last_3d))
        return engine, lambda x: x.contiguous(memory_format=torch.channels_last_3d)
    if engine_name == "torch-compile":
        engine = TorchEngine(precision)
        engine.bind(torch.compile(network))
        engine.network.classify = torch.compile(network.classify)
        return engine, None
    static = engine_name == "openvino-static"
    engine = make_engine("openvino" if static else engine_name, precision, cache_dir=engine_cache_dir(model))
    engine.static_shapes = static
    engine.bind(network, weights)
    return engine, None


def main() -> None:
    import numpy as np
    import torch

    from nnunet_mtl.inference.predict import load_predictor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="trained model folder")
    parser.add_argument("--image", type=Path, help="a <case>_0000.nii.gz to predict (default: seeded noise)")
    parser.add_argument("--shape", type=int, nargs="+", help="input shape (default: the patch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        choices=[*VARIANTS, *TORCH_LEVERS, *SHAPE_POLICIES])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    predictor = load_predictor(args.model, folds=None)
    predictor.network.eval()
    shape = tuple(args.shape or predictor.configuration_manager.patch_size)
    x = input_tensor(predictor, args.image, shape)
    engines = {}
    first = {}
    for name in args.variants:
        start = time.perf_counter()
        engine, prepare = make_variant(name, predictor, args.model)
        with torch.inference_mode():
            inputs = prepare(x) if prepare else x
            engine.forward(inputs)
        first[name] = time.perf_counter() - start
        engines[name] = (engine, prepare)
    with torch.inference_mode():
        reference_seg, reference_logits = engines.get("torch:fp32", (None,))[0].forward(x) \
            if "torch:fp32" in engines else make_variant("torch:fp32", predictor, args.model)[0].forward(x)
        probability = torch.softmax(reference_seg, 1)[:, -1:]
        forward_s = {n: [] for n in engines}
        classify_s = {n: [] for n in engines}
        outputs = {}
        for _ in range(args.rounds):
            for name, (engine, prepare) in engines.items():
                inputs = prepare(x) if prepare else x
                start = time.perf_counter()
                outputs[name] = engine.forward(inputs)
                forward_s[name].append(time.perf_counter() - start)
                start = time.perf_counter()
                engine.classify(inputs, probability)
                classify_s[name].append(time.perf_counter() - start)
    print(f"model {args.model}\ninput {'noise' if args.image is None else args.image.name} shape {shape}, "
          f"{args.threads} threads, best of {args.rounds} rounds; load (uptime): {os.getloadavg()}")
    print(f"{'variant':<26}{'first s':>9}{'forward s':>11}{'x fp32':>8}{'classify s':>12}{'labels same':>13}"
          f"{'subtype p diff':>16}")
    base = min(forward_s["torch:fp32"]) if "torch:fp32" in forward_s else None
    ref_labels = reference_seg.argmax(1)
    ref_p = torch.softmax(reference_logits, 1)
    for name in engines:
        seg, logits = outputs[name]
        agree = float((seg.argmax(1) == ref_labels).float().mean())
        pdiff = float((torch.softmax(logits, 1) - ref_p).abs().max())
        ratio = f"{base / min(forward_s[name]):.2f}" if base else ""
        print(f"{name:<26}{first[name]:>9.2f}{min(forward_s[name]):>11.3f}{ratio:>8}{min(classify_s[name]):>12.3f}"
              f"{agree:>13.5f}{pdiff:>16.5f}")
    print(f"\nseconds per round (forward): { {n: np.round(v, 2).tolist() for n, v in forward_s.items()} }")


if __name__ == "__main__":
    main()
