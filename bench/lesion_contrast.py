"""Which true lesions a model misses, by their contrast with the gland around them.

Reads a phantom's test images and truth and the per-lesion table of ``nnunet-mtl evaluate`` on a model's
predictions of them (``metrics_per_lesion.csv``), and measures for every true lesion its mean HU minus the mean HU of
the gland (label 1) within 3 voxels of it. Prints detection by contrast band and size, so that a drop on another
site can be traced to lesions whose appearance the training site never showed (on phantom site B: hyper-enhancing
lesions 25-50 HU above the gland, against 55-115 HU on site A).

  python bench/lesion_contrast.py --phantom work/phantom_B --evaluation work/eval_preds_A_on_B

A second table gives detection, mean |contrast| and the contrast-to-noise ratio by lesion size (``--min-ml 0
--max-ml inf`` for all lesions).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage

RING_VOXELS = 3
BANDS_HU = (-np.inf, -40.0, -15.0, 15.0, 50.0, np.inf)


def lesion_contrasts(phantom: Path, evaluation: Path, min_volume_ml: float, max_volume_ml: float) -> list[dict]:
    """One row per true lesion in the volume range: case, volume, status, contrast (HU) with the nearby gland."""
    from nnunet_mtl.data.nifti import read_volume
    from nnunet_mtl.evaluation.lesions import label_components

    table = evaluation / "metrics_per_lesion.csv"
    if not table.is_file():
        raise SystemExit(f"{table} not found: run `nnunet-mtl evaluate --pred PRED --truth TRUTH -o {evaluation}`")
    by_case: dict[str, list[dict]] = defaultdict(list)
    with table.open() as f:
        for row in csv.DictReader(f):
            if row["kind"] == "true" and min_volume_ml <= float(row["volume_ml"]) < max_volume_ml:
                by_case[row["case"]].append(row)
    rows = []
    ring = np.ones((2 * RING_VOXELS + 1,) * 3, bool)
    for case, lesions in sorted(by_case.items()):
        image = read_volume(phantom / "test" / f"{case}_0000.nii.gz", "image").array.astype(np.float32)
        labels = np.rint(read_volume(phantom / "test_groundtruth" / f"{case}.nii.gz", "mask").array)
        components, _ = label_components(labels == 2)
        gland = labels == 1
        for lesion in lesions:
            mask = components == int(lesion["index"])
            near = ndimage.binary_dilation(mask, ring) & gland
            if near.sum() < 10:
                near = gland
            near_hu = image[near]
            contrast = float(image[mask].mean() - near_hu.mean()) if near_hu.size else float("nan")
            noise = float(near_hu.std()) if near_hu.size else float("nan")
            rows.append({"case": case, "volume_ml": float(lesion["volume_ml"]), "status": lesion["status"],
                         "contrast_hu": contrast, "cnr": abs(contrast) / noise if noise > 0 else float("nan")})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phantom", type=Path, required=True, help="phantom folder with test/ and test_groundtruth/")
    parser.add_argument("--evaluation", type=Path, required=True, help="`nnunet-mtl evaluate` output folder")
    parser.add_argument("--min-ml", type=float, default=0.1, help="smallest true lesion counted (default 0.1 ml)")
    parser.add_argument("--max-ml", type=float, default=5.0, help="largest (exclusive; default 5 ml)")
    args = parser.parse_args()
    rows = lesion_contrasts(args.phantom, args.evaluation, args.min_ml, args.max_ml)
    print(f"true lesions of {args.min_ml:g}-{args.max_ml:g} ml: {len(rows)}; contrast = lesion mean HU - mean HU of "
          f"the gland within {RING_VOXELS} voxels")
    print(f"{'contrast band (HU)':<22}{'lesions':>9}{'detected':>10}{'share':>8}{'median ml':>11}")
    for low, high in zip(BANDS_HU[:-1], BANDS_HU[1:]):
        band = [r for r in rows if low <= r["contrast_hu"] < high]
        found = sum(r["status"] == "detected" for r in band)
        share = f"{found / len(band):.2f}" if band else "-"
        median = f"{np.median([r['volume_ml'] for r in band]):.2f}" if band else "-"
        print(f"{f'{low:g} to {high:g}':<22}{len(band):>9}{found:>10}{share:>8}{median:>11}")
    print("by size; CNR = |contrast| / SD of the HU of that nearby gland")
    print(f"{'size (ml)':<22}{'lesions':>9}{'detected':>10}{'|contrast| HU':>15}{'median CNR':>12}")
    from nnunet_mtl.evaluation.lesions import DEFAULT_SIZE_BINS_ML

    edges = (0.0, *DEFAULT_SIZE_BINS_ML, np.inf)  # the size bins `nnunet-mtl evaluate` reports
    for low, high in zip(edges[:-1], edges[1:]):
        size = [r for r in rows if low <= r["volume_ml"] < high]
        if not size:
            continue
        found = sum(r["status"] == "detected" for r in size)
        contrast = np.mean([abs(r["contrast_hu"]) for r in size])
        print(f"{f'{low:g} to {high:g}':<22}{len(size):>9}{found:>10}{contrast:>15.1f}"
              f"{np.nanmedian([r['cnr'] for r in size]):>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
