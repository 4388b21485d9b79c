"""One prepared check of the CUDA path at the real crop size, for a lent GPU machine (see bench/gpu_check.sh).

It runs `bench/real_scale.py` on a small `full`-preset phantom (3/3/3 training, 1/1/1 validation, 6 test cases at the
real crop size and spacing), most important figures first, each step within what is left of the time budget:
  1. phantom + import + plan (nnU-Net's default planner)
  2. train step: our trainer vs stock nnUNetTrainer, AMP, same batches, alternated (the <= 1.05x bar)
  3. prediction: stock (step 0.5, mirroring) vs ours default vs ours fast (nnU-Net's torch resampler on the GPU)
     vs fast with the plans' CPU resampler vs the one-pass floor, each mode in its own process
  4. one case-level validation of the validation cases (the cadence of item 4 wants its GPU seconds)
  5. fast mode step by step (where a case's time goes on a GPU)
The weights come from a few steps only: the timings are what this is for. Figures go to $OUT/gpu_check.json and
$OUT/gpu_check.txt (the rehearsal's summary), also when the budget runs out part way.

  python3 bench/gpu_check.py                         # on the GPU machine (bench/gpu_check.sh installs first)
  python bench/gpu_check.py --device cpu --tiny      # dry run on a CPU: the same steps on a tiny phantom
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REHEARSAL = REPO / "bench" / "real_scale.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small phantom and demo network (a CPU dry run)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all steps (default 420)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gpu_work"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_check")))
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget
    os.environ.setdefault("nnUNet_def_n_proc", str(min(os.cpu_count() or 1, 8)))
    os.environ.setdefault("nnUNet_n_proc_DA", str(min(os.cpu_count() or 1, 8)))
    os.environ.setdefault("nnUNet_compile", "false")
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--workdir", str(args.workdir), "--device", args.device, "--planners", "default"]
    common += ["--tiny"] if args.tiny else ["--train-per-subtype", "3,3,3", "--val-per-subtype", "1,1,1",
                                          "--test-cases", "6"]
    steps = [  # (what, extra arguments, seconds it needs at least)
        ("data + plans", ["--stages", "phantom", "import", "plan"], 60),
        ("train step, AMP", ["--stages", "train", "--iterations", "10"], 45),
        ("prediction", ["--stages", "predict", "--cases", "6", "--modes", "stock", "default", "fast",
                        "fast_plansres", "floor"], 90),
        ("case-level validation", ["--stages", "validate"], 30),
        ("fast mode step by step", ["--stages", "profile", "--profile-cases", "3"], 40),
    ]
    done = {}
    try:
        for what, extra, needs in steps:
            left = deadline - time.monotonic()
            if left < needs:
                print(f"=== {what}: skipped, {left:.0f} s left of the budget", flush=True)
                done[what] = "skipped (budget)"
                continue
            print(f"=== {what} ({left:.0f} s left)", flush=True)
            start = time.monotonic()
            try:
                result = subprocess.run([sys.executable, str(REHEARSAL), *common, *extra], timeout=left)
                done[what] = f"exit {result.returncode} in {time.monotonic() - start:.0f} s"
            except subprocess.TimeoutExpired:
                done[what] = "stopped at the budget"
            print(f"    {done[what]}", flush=True)
    finally:
        summary = subprocess.run([sys.executable, str(REHEARSAL), *common, "--summary"], capture_output=True,
                                 text=True)
        (args.out / "gpu_check.txt").write_text(summary.stdout + summary.stderr[-3000:])
        print(summary.stdout, summary.stderr[-3000:])
        state = args.workdir / "real_scale.json"
        if state.is_file():
            shutil.copy(state, args.out / "real_scale.json")
        (args.out / "gpu_check.json").write_text(json.dumps({"steps": done, "device": args.device}, indent=1))


if __name__ == "__main__":
    main()
