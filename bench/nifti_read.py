"""Reading one NIfTI file: the verified reader (data/nifti.py) against SimpleITK and nnU-Net's own reader.

Every variant reads the same file in turn, round after round (side by side, so machine load hits them alike), and
the medians and ratios are printed with the load. Variants:

- ``sitk``: ``sitk.GetArrayFromImage(sitk.ReadImage(f))``, what the project did before (no integrity check);
- ``ours``: ``read_volume(f)`` (gzip read to its end, CRC and length checked, header matched by the data);
- ``check+sitk``: Python's gzip read to its end, then SimpleITK reads the file again (checking without the reader:
  the file is decompressed twice);
- ``nnunet``: ``SimpleITKIO().read_images([f])`` (what nnU-Net's preprocessing reads), against
- ``ours->nnunet``: ``read_volume(f).nnunet_input()`` (the same array and properties, handed to ``run_case_npy``).

    python bench/nifti_read.py [--shape 120 384 384] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def ct_like(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Smooth anatomy-like structure plus noise, int16: compresses about as a real CT crop does."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(0, 6, n, dtype=np.float32) for n in shape), indexing="ij")
    return (300 * np.sin(z + y) * np.cos(x) + rng.normal(0, 30, shape)).astype(np.int16)


def main() -> None:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_mtl.data.nifti import read_volume

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[120, 384, 384], metavar=("Z", "Y", "X"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ct_0000.nii.gz"
        array = ct_like(tuple(args.shape))
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.73, 0.73, 2.0))
        sitk.WriteImage(image, str(path), True)
        print(f"file: {args.shape} int16, {path.stat().st_size / 1e6:.1f} MB compressed, {array.nbytes / 1e6:.1f} MB "
              "of voxels")

        def check_then_sitk():
            with gzip.open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
            return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

        variants = {
            "sitk": lambda: sitk.GetArrayFromImage(sitk.ReadImage(str(path))),
            "ours": lambda: read_volume(path).array,
            "check+sitk": check_then_sitk,
            "nnunet": lambda: SimpleITKIO().read_images([str(path)])[0],
            "ours->nnunet": lambda: read_volume(path).nnunet_input()[0],
        }
        reference = variants["sitk"]()
        assert np.array_equal(variants["ours"](), reference)
        assert np.array_equal(variants["ours->nnunet"](), variants["nnunet"]())
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, read in variants.items():
                start = time.perf_counter()
                read()
                seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    for name, value in median.items():
        every = ", ".join(f"{v:.3f}" for v in seconds[name])
        print(f"{name:>13}: {value:.3f} s (median of {args.rounds}; all {every})")
    print(f"ours / sitk = {median['ours'] / median['sitk']:.2f}; check+sitk / sitk = "
          f"{median['check+sitk'] / median['sitk']:.2f}; ours->nnunet / nnunet = "
          f"{median['ours->nnunet'] / median['nnunet']:.2f}")
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip() if os.name == "posix"
          else "n/a")


if __name__ == "__main__":
    main()
