"""Is the head's cross-site drop the lesion mask or the head itself? The head attending to the TRUE lesion.

At prediction the subtype head sees one patch centred on the *predicted* lesion and attends to the decoder's lesion
probability. Here the same network, weights, temperature and fast-mode preprocessing classify each test case from a
patch centred on the *true* lesion (the largest true lesion component in the gland, on the preprocessed grid),
attending to the true lesion mask. Beside it, the product's own answer on the same cases (``preds_<run>_on_<site>``
of bench/classification.py, calibrated head). If the head on true masks stays far below the bar on a shifted site,
the head itself (what it learned of intensity and texture) limits the subtype there; if it reaches it, the mask does.

Printed per site: macro-F1 of both with 95 % bootstrap intervals, their paired difference, and cases right by true
lesion size (typical lesions apart from the atypical mimics of ``phantom.json``). Results are cached per site
(``head_true_<run>_<site>.json``).

  M=/work/bench_cls/nnunet/nnUNet_results/Dataset710_SiteA/nnUNetTrainerMTL__nnUNetPlans_MTLdemo_long__3d_fullres
  python bench/head_on_true_masks.py --workdir /work/bench_cls --run A_long --model $M --sites A B C [--decompose]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classification import bootstrap, macro_f1, paired_difference  # noqa: E402

SIZE_BINS_ML = (0.0, 0.2, 1.0, 5.0, float("inf"))


# patch centre / attention. "predicted" attention is the decoder's lesion probability over the patch (what predict
# uses); "component" the predicted lesion the centre comes from, as a mask (the head trained on true masks);
# "region" that component grown into its connected voxels of lesion probability >= REGION_PROBABILITY (lesion voxels
# the argmax labelled pancreas: site B's lesions of 1-5 ml are drawn as slivers of themselves).
COMBINATIONS = ("true/true", "true/predicted", "predicted/true", "predicted/predicted", "predicted/component",
                "predicted/region")
REGION_PROBABILITY = 0.2


def head_logits(model: Path, phantom: Path, cases: list[dict], decompose: bool) -> dict[str, dict]:
    """Head logits (fast mode's network, no mirroring) per case on a patch centred on the true lesion and attending
    to its mask; with ``decompose`` also every mix of true and predicted centre and attention (one fast pass over
    the crop gives the predicted lesion and its probability, as in ``predict``)."""
    import SimpleITK as sitk
    import torch
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    from nnunet_mtl.inference.predict import PredictionMode, load_predictor, read_image
    from nnunet_mtl.inference.predictor import lesion_tile_region, mask_centre
    from nnunet_mtl.model.lesion_features import select_lesion

    predictor = load_predictor(model, mode=PredictionMode.fast())
    predictor._bind_engine()
    pm, cm = predictor.plans_manager, predictor.configuration_manager
    preprocessor = cm.preprocessor_class(verbose=False)
    patch = np.array(cm.patch_size)

    two_channels = predictor.network.attention_channels == 2  # a context head also reads the gland

    def classify(data: np.ndarray, centre: np.ndarray, attention: np.ndarray, gland: np.ndarray) -> list[float]:
        region = lesion_tile_region(centre, patch, data.shape[1:])  # predict's own tile
        tile = pad_nd_image(torch.from_numpy(np.ascontiguousarray(data[(slice(None), *region)])).float(),
                            [int(p) for p in patch])[None]
        channels = [gland[region], attention[region]] if two_channels else [attention[region]]
        weights = pad_nd_image(torch.from_numpy(np.ascontiguousarray(np.stack(channels), np.float32)),
                               [int(p) for p in patch])[None]
        with torch.no_grad():
            return predictor.engine.classify(tile, weights).float().cpu().numpy()[0].tolist()

    out = {}
    for case in cases:
        data, properties = read_image(phantom / case["image"]).nnunet_input()
        mask = sitk.ReadImage(str(phantom / case["mask"]))
        truth = sitk.GetArrayFromImage(mask)[None].astype(np.float32)
        data, seg, _ = preprocessor.run_case_npy(data, truth, properties, pm, cm, predictor.dataset_json)
        true_lesion = select_lesion(np.asarray(seg[0]), 2)
        record: dict = dict.fromkeys(COMBINATIONS if decompose else COMBINATIONS[:1])
        if decompose:
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data))
            predicted_lesion = select_lesion(predictor.crop_labels(logits), 2)
            softmax = torch.softmax(logits.float(), 0).numpy()
            probability, predicted_gland = softmax[-1], softmax[1]
        else:
            predicted_lesion = probability = predicted_gland = None
        centres = {"true": true_lesion, "predicted": predicted_lesion}
        attentions = {"true": true_lesion, "predicted": probability, "component": predicted_lesion,
                      "region": None if predicted_lesion is None else grown(predicted_lesion, probability)}
        # the gland beside each attention: the true gland with the true lesion, the decoder's with its own
        glands = {"true": np.asarray(seg[0]) == 1, "predicted": predicted_gland, "component": predicted_gland,
                  "region": predicted_gland}
        for key in record:
            centre, attention = key.split("/")
            if centres[centre] is not None and attentions[attention] is not None:
                record[key] = classify(data, mask_centre(centres[centre]), attentions[attention], glands[attention])
        record["ml"] = float((truth == 2).sum() * np.prod(mask.GetSpacing()) / 1000.0)  # true lesion volume
        out[case["name"]] = record
    return out


def grown(component: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """``component`` with every connected region of lesion probability >= REGION_PROBABILITY that touches it."""
    from scipy import ndimage

    regions, _ = ndimage.label((probability >= REGION_PROBABILITY) | component, np.ones((3, 3, 3), bool))
    return np.isin(regions, np.unique(regions[component])) & (regions > 0)


def by_size(y: np.ndarray, p: np.ndarray, ml: np.ndarray, keep: np.ndarray) -> str:
    cells = []
    for low, high in zip(SIZE_BINS_ML[:-1], SIZE_BINS_ML[1:]):
        inside = keep & (ml >= low) & (ml < high)
        cells.append(f"{int((p[inside].argmax(1) == y[inside]).sum())}/{int(inside.sum())}")
    return ", ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="bench/classification.py's workdir")
    parser.add_argument("--run", required=True, help="the run whose predictions to compare (preds_<run>_on_<site>)")
    parser.add_argument("--model", type=Path, required=True, help="that run's model folder")
    parser.add_argument("--sites", nargs="+", default=["A", "B"])
    parser.add_argument("--decompose", action="store_true",
                        help="also mix true and predicted patch centre and attention (a fast pass per case)")
    args = parser.parse_args()

    from nnunet_mtl.inference.outputs import read_details
    from nnunet_mtl.model.subtype_classifier import load_classifier, softmax

    classifier = load_classifier(args.model)
    print(f"the head of {args.run} attending to the true lesion vs the product's predicted lesion "
          "(calibrated head; 95 % bootstrap over cases)")
    print(f"{'site  head on':<46} {'macro-F1':<21}   typical right, by true lesion size   atypical right")
    print(f"{'':<70}(<0.2 / 0.2-1 / 1-5 / >=5 ml)")
    for site in args.sites:
        phantom = args.workdir / f"phantom_{site}"
        summary = json.loads((phantom / "phantom.json").read_text())
        cases = sorted((c for c in summary["cases"] if c["split"] == "test"), key=lambda c: c["name"])
        cache = args.workdir / f"head_true_{args.run}_{site}.json"
        stored = json.loads(cache.read_text()) if cache.is_file() else {}
        wanted = COMBINATIONS if args.decompose else COMBINATIONS[:1]
        if not all(c["name"] in stored and all(k in stored[c["name"]] for k in wanted) for c in cases):
            stored = head_logits(args.model, phantom, cases, args.decompose)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(stored))
            tmp.replace(cache)
        details = read_details(args.workdir / f"preds_{args.run}_on_{site}")
        names = [c["name"] for c in cases]
        y = np.array([c["subtype"] for c in cases])
        atypical = np.array([bool(c["atypical"]) for c in cases])
        ml = np.array([stored[n]["ml"] for n in names])

        def calibrated(logits):
            if logits is None:  # no predicted lesion to centre on or attend to (predict falls back to its tiles)
                return np.full(3, 1 / 3)
            return classifier.probabilities([np.asarray(logits)], None)["cnn"] if classifier else softmax(logits)

        product_p = np.array([details[n]["probabilities"]["cnn"] for n in names])
        rows = [(f"centre/attention {key}", np.array([calibrated(stored[n][key]) for n in names]))
                for key in wanted]
        for label, p in [*rows, ("product (predictions folder)", product_p)]:
            value, low, high = bootstrap(y, p, macro_f1)
            right = p.argmax(1) == y
            print(f"{site:<5} {label:<40} {value:.3f} [{low:.3f}, {high:.3f}]   "
                  f"{by_size(y, p, ml, ~atypical):<26} {int(right[atypical].sum())}/{int(atypical.sum())}")
        diff, low, high = paired_difference({"y": y.tolist(), "probabilities": product_p.tolist()},
                                            {"y": y.tolist(), "probabilities": rows[0][1].tolist()}, macro_f1)
        print(f"{site:<5} {'true/true minus product':<40} {diff:+.3f} [{low:+.3f}, {high:+.3f}]\n")


if __name__ == "__main__":
    main()
