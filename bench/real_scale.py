"""Real-scale rehearsal: the full-size path end to end on the `full` phantom (real counts, crop sizes, spacing).

Stages, each in its own process (its peak memory is its own: the process and its children, sampled from /proc):
  phantom    the `full` phantom preset: 252 / 36 / 72 cases at real crop size and spacing (about 0.73 mm)
  import     `nnunet-mtl import` of the phantom
  plan       nnU-Net's fingerprint, default planner + preprocessing, then the ResEnc M planner (same data)
  train      per planner: our trainer and stock nnUNetTrainer on the same U-Net, alternated step by step on the
             same batches; data loading + augmentation and validation steps timed apart; the weights after these
             few steps become the model folder the later stages use (timings only: it has learned nothing)
  validate   one case-level validation of the validation cases, as training runs it (fast mode, preprocessed grid)
  profile    fast mode per case, step by step: read, crop, normalise, resample, network, lesion tile, resample
             back, write; the plans' resampler and nnU-Net's torch resampler side by side, with the Dice of their
             exported masks against each other
  predict    >= 10 test cases in every prediction mode (MODES: stock / default / fast / fast_seg / floor), each mode
             in its own process, modes alternated by round
Finished stages are recorded in WORKDIR/real_scale.json and reused (the data and plans take long at this size);
`--redo STAGE` runs one again. The summary prints seconds per stage, per iteration and per case, peak memory, the
ratios the bars ask for, and projects the 1000 epochs x 250 iterations protocol from the figures.

  python bench/real_scale.py                                   # everything, WORKDIR work/real-scale (make real-scale)
  python bench/real_scale.py --stages predict --cases 10 --modes fast floor
  python bench/real_scale.py --summary                         # print the recorded figures only
  python bench/real_scale.py --tiny --workdir /tmp/rs-tiny     # a few small cases: checks the script in minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
DATASET_ID = 601
DATASET_NAME = "PancreasFull"
PLANNERS = ("default", "resenc-m")
STAGES = ("phantom", "import", "plan", "train", "validate", "profile", "predict")
GIB = 1024 ** 3
MEMORY_LIMIT_GB = 24.0  # this machine's memory


# ------------------------------------------------------------------------------------------ prediction modes
@dataclass(frozen=True)
class Mode:
    """A prediction mode of the benchmark: ``run(model, images, out, device)`` predicts the folder and returns
    seconds per case. Engines (OpenVINO, ONNX Runtime) join as more ``ours(...)`` entries with their mode."""

    name: str
    description: str
    run: Callable[[Path, Path, Path, str], dict[str, float]]


def ours(make_mode: Callable[[], object]) -> Callable[[Path, Path, Path, str], dict[str, float]]:
    """Our predictor (``predict_folder`` -> ``load_predictor(..., mode=...)``) in the mode ``make_mode`` builds."""

    def run(model: Path, images: Path, out: Path, device: str) -> dict[str, float]:
        from nnunet_mtl.inference.predict import predict_folder
        from nnunet_mtl.training.run import resolve_device

        report = predict_folder(model, images, out, device=resolve_device(device), mode=make_mode(),
                                overwrite=True, progress=False)
        if report.failed:
            raise RuntimeError(report.failed)
        return report.seconds_per_case

    return run


def stock(model: Path, images: Path, out: Path, device: str) -> dict[str, float]:
    """nnU-Net's own predictor and its predict_from_files (spawned pools), default settings, segmentation only."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_mtl.inference.predict import list_cases, load_predictor
    from nnunet_mtl.training.run import resolve_device

    dev = resolve_device(device)
    ours_predictor = load_predictor(model, device=dev)
    network = ours_predictor.network
    network.return_classification = False
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, device=dev,
                                allow_tqdm=False)
    predictor.manual_initialization(network, ours_predictor.plans_manager, ours_predictor.configuration_manager,
                                    ours_predictor.list_of_parameters, ours_predictor.dataset_json,
                                    "nnUNetTrainerMTL", ours_predictor.allowed_mirroring_axes)
    n_proc = int(os.environ.get("nnUNet_def_n_proc", "2"))
    cases = list_cases(images)
    start = time.perf_counter()
    predictor.predict_from_files(str(images), str(out), save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=n_proc, num_processes_segmentation_export=n_proc)
    seconds = (time.perf_counter() - start) / len(cases)
    return dict.fromkeys(cases, seconds)  # one folder call: the mean per case


def floor(model: Path, images: Path, out: Path, device: str) -> dict[str, float]:
    """One forward pass of the network over each preprocessed crop, padded to the stride: the lower bound."""
    import numpy as np
    import torch

    from nnunet_mtl.inference.predict import list_cases, load_predictor
    from nnunet_mtl.training.run import resolve_device

    dev = resolve_device(device)
    predictor = load_predictor(model, device=dev)
    pm, cm = predictor.plans_manager, predictor.configuration_manager
    network = predictor.network.to(dev).eval()
    stride = np.prod(np.array(cm.pool_op_kernel_sizes), axis=0)
    seconds = {}
    for case, image in list_cases(images).items():
        data, _, _ = cm.preprocessor_class(verbose=False).run_case([str(image)], None, pm, cm,
                                                                   predictor.dataset_json)
        padded = (np.ceil(np.array(data.shape[1:]) / stride) * stride).astype(int)
        x = torch.zeros((1, 1, *padded), device=dev)
        with torch.inference_mode():
            start = time.perf_counter()
            network(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds[case] = time.perf_counter() - start
    return seconds


def _default():
    from nnunet_mtl.inference.predict import PredictionMode
    return PredictionMode()


def _fast(classify: bool = True, resampler: str = "torch"):
    def make():
        from nnunet_mtl.inference.predict import PredictionMode
        return PredictionMode.fast(classify=classify, resampler=resampler)
    return make


MODES = {m.name: m for m in (
    Mode("stock", "nnU-Net's predictor (step 0.5, mirroring), segmentation only", stock),
    Mode("default", "ours, nnU-Net's settings, masks + subtype", ours(_default)),
    Mode("fast", "ours --fast, masks + subtype", ours(_fast())),
    Mode("fast_seg", "ours --fast with the head switched off (prices the subtype)", ours(_fast(classify=False))),
    Mode("floor", "one forward pass over each preprocessed crop (the lower bound)", floor),
    Mode("fast_plansres", "ours --fast with the plans' resampler instead of torch's (prices the resampler)",
         ours(_fast(resampler="plans"))),
)}
DEFAULT_MODES = ("stock", "default", "fast", "fast_seg", "floor")


# ---------------------------------------------------------------------------------------------- stage workers
def configure(workdir: Path):
    from nnunet_mtl import paths

    return paths.configure(workdir)


def stage_phantom(workdir: Path, opts: dict) -> dict:
    from nnunet_mtl.data.phantom import generate_phantom_dataset

    counts = opts.get("counts") or {}
    existing = workdir / "phantom" / "phantom.json"  # written last: a dataset with it is complete
    if existing.is_file():
        summary = json.loads(existing.read_text())
        wanted = {k: counts.get(k) for k in ("train", "validation", "test")}
        if summary["preset"] == opts["preset"] and summary["seed"] == opts["seed"] and all(
                v is None or summary["counts"][k] == v for k, v in wanted.items()):
            return {"cases": summary["n_cases"], "counts": summary["counts"], "reused": True}
    summary = generate_phantom_dataset(workdir / "phantom", opts["preset"], seed=opts["seed"],
                                       train_per_subtype=counts.get("train"), val_per_subtype=counts.get("validation"),
                                       n_test=counts.get("test"), force=True, progress=False)
    return {"cases": summary["n_cases"], "counts": summary["counts"]}


def stage_import(workdir: Path, opts: dict) -> dict:
    import shutil

    from nnunet_mtl.data.importer import import_dataset, scan_published

    work = configure(workdir)
    shutil.rmtree(work.raw / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}", ignore_errors=True)
    import_dataset(scan_published(workdir / "phantom"), work.raw, DATASET_ID, DATASET_NAME, progress=False)
    return {}


def stage_plan(workdir: Path, opts: dict) -> dict:
    from nnunet_mtl.planning.plans import plan_and_preprocess

    work = configure(workdir)
    seconds, out = {}, {}
    for planner in opts["planners"]:
        start = time.perf_counter()
        written = plan_and_preprocess(DATASET_ID, planner, preset=opts.get("preset_plans"), force=planner == "default")
        seconds[planner] = time.perf_counter() - start
        name = list(written)[-1]  # the preset's plans when one is asked for, else the full protocol's
        config = json.loads(written[name].read_text())["configurations"]["3d_fullres"]
        out[planner] = {"plans": name, "patch_size": config["patch_size"], "batch_size": config["batch_size"],
                        "spacing": config["spacing"],
                        "features": config["architecture"]["arch_kwargs"]["features_per_stage"]}
    folder = work.preprocessed / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
    data = folder / json.loads((folder / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"][
        "data_identifier"]
    return {"seconds_per_planner": seconds, "plans": out,
            "preprocessed_gb": sum(f.stat().st_size for f in data.iterdir()) / GIB}


class ForwardTimer:
    """Seconds spent in a module's forward passes (hooks; nothing of the module changes)."""

    def __init__(self, module) -> None:
        self.seconds, self.calls, self._start = 0.0, 0, 0.0
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_):
        self._start = time.perf_counter()

    def _post(self, *_):
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def plans_arg(planner: str, opts: dict) -> str:
    from nnunet_mtl.planning.plans import resolve_plans_identifier

    return resolve_plans_identifier(planner) + (opts.get("preset_plans") or "")


def stage_train(workdir: Path, opts: dict) -> dict:
    """Our trainer vs stock nnUNetTrainer, alternated step by step on the same batches."""
    os.environ["nnUNet_n_proc_DA"] = "0"  # data loading in this process, timed apart from the steps
    work = configure(workdir)
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from train_step import stock_plans_from

    from nnunet_mtl.planning.plans import CONFIGURATION
    from nnunet_mtl.training.run import build_trainer, resolve_device

    planner, steps = opts["planner"], opts["iterations"]
    plans_id = plans_arg(planner, opts)
    trainer = build_trainer(DATASET_ID, plans_id, 0, opts["device"])
    trainer.initialize()
    if opts.get("batch_size"):  # a smaller batch where memory is short; the ratio compares like with like
        trainer.batch_size = opts["batch_size"]
    dl_train, dl_val = trainer.get_dataloaders()
    loading, batches = [], []
    for _ in range(steps + 1):
        start = time.perf_counter()
        batches.append(next(dl_train))
        loading.append(time.perf_counter() - start)
    folder = work.preprocessed / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
    plans = json.loads((folder / f"{plans_id}.json").read_text())
    stock_plans = stock_plans_from(plans)
    stock_plans["continue_training"] = False
    stock_trainer = nnUNetTrainer(stock_plans, CONFIGURATION, 0, trainer.dataset_json, resolve_device(opts["device"]))
    stock_trainer.initialize()
    stock_trainer.batch_size = trainer.batch_size
    trainer.network.train()
    stock_trainer.network.train()

    def timed(t, batch) -> float:
        start = time.perf_counter()
        t.train_step(batch)
        if t.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    warmup = {"multi-task": timed(trainer, batches[0]), "stock": timed(stock_trainer, batches[0])}
    times = {"multi-task": [], "stock": []}
    for i, batch in enumerate(batches[1:]):
        order = [("multi-task", trainer), ("stock", stock_trainer)]
        for name, t in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
            times[name].append(timed(t, batch))
    trainer.network.eval()
    val_times = []
    with torch.no_grad():
        for _ in range(2):
            batch = next(dl_val)
            start = time.perf_counter()
            trainer.validation_step(batch)
            val_times.append(time.perf_counter() - start)
    # the model folder the later stages use: nnU-Net's layout, as on_train_start and a final save would leave it
    Path(trainer.output_folder).mkdir(parents=True, exist_ok=True)
    save_json(trainer.plans_manager.plans, str(Path(trainer.output_folder_base) / "plans.json"), sort_keys=False)
    save_json(trainer.dataset_json, str(Path(trainer.output_folder_base) / "dataset.json"), sort_keys=False)
    trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
    median = {k: float(np.median(v)) for k, v in times.items()}
    return {"plans": plans_id, "patch_size": list(trainer.configuration_manager.patch_size),
            "batch_size": trainer.batch_size, "steps_each": steps, "step_seconds": times, "warmup_seconds": warmup,
            "median_step_seconds": median, "ratio": median["multi-task"] / median["stock"],
            "data_loading_seconds": loading, "validation_step_seconds": val_times,
            "model_folder": str(trainer.output_folder_base)}


def stage_validate(workdir: Path, opts: dict) -> dict:
    """One case-level validation of the whole validation fold, as the trainer runs it every few epochs."""
    os.environ["nnUNet_n_proc_DA"] = "0"
    configure(workdir)
    from nnunet_mtl.training.run import build_trainer

    trainer = build_trainer(DATASET_ID, plans_arg(opts["planner"], opts), 0, opts["device"])
    trainer.initialize()
    trainer.load_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
    timer = ForwardTimer(trainer.network)
    start = time.perf_counter()
    metrics = trainer.case_level_validation()
    seconds = time.perf_counter() - start
    timer.remove()
    _, val_keys = trainer.do_split()
    return {"cases": len(val_keys), "seconds": seconds, "seconds_per_case": seconds / len(val_keys),
            "network_seconds": timer.seconds, "forward_passes": timer.calls, "metrics": metrics}


def stage_profile(workdir: Path, opts: dict) -> dict:
    from profile_fast import profile_fast_mode

    return profile_fast_mode(Path(opts["model"]), Path(opts["images"]), workdir / "profile", opts["device"],
                             opts.get("resamplers", ["plans", "torch"]))


def stage_predict_mode(workdir: Path, opts: dict) -> dict:
    mode = MODES[opts["mode"]]
    out = workdir / "predictions" / mode.name / Path(opts["images"]).name
    seconds = mode.run(Path(opts["model"]), Path(opts["images"]), out, opts["device"])
    return {"mode": mode.name, "seconds_per_case": seconds}


WORKERS = {"phantom": stage_phantom, "import": stage_import, "plan": stage_plan, "train": stage_train,
           "validate": stage_validate, "profile": stage_profile, "predict_mode": stage_predict_mode}


def worker_main(stage: str, workdir: Path, opts: dict) -> None:
    result = WORKERS[stage](workdir, opts)
    self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2
    print("RESULT " + json.dumps({**result, "process_peak_gb": self_peak, "largest_child_peak_gb": child_peak}))


# ------------------------------------------------------------------------------------------------- the driver
def tree_memory_bytes(pid: int) -> int:
    """Memory of a process and all its descendants, from /proc: the sum of their proportional set sizes (PSS), so
    libraries that spawned workers share (torch, numpy) count once; resident size where PSS cannot be read."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            try:
                with open(f"/proc/{p}/statm") as f:
                    total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except OSError:
                continue
    return total


def run_stage(stage: str, workdir: Path, opts: dict, log: Path) -> dict:
    """Run a worker in its own process, sampling its process tree's memory; returns its RESULT plus timings."""
    command = [sys.executable, __file__, "--worker", stage, "--workdir", str(workdir), "--opts", json.dumps(opts)]
    log.parent.mkdir(parents=True, exist_ok=True)
    load_before = round(os.getloadavg()[0], 1)
    start = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {stage} {json.dumps(opts)}\n")
        f.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=f, text=True)
        peak = [0]

        def sample() -> None:
            while process.poll() is None:
                peak[0] = max(peak[0], tree_memory_bytes(process.pid))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            stdout, _ = process.communicate()
        except BaseException:  # interrupted: leave no worker behind
            process.kill()
            process.wait()
            raise
        sampler.join()
        f.write(stdout)
    if process.returncode != 0:
        raise RuntimeError(f"stage {stage} failed (exit {process.returncode}); see {log}")
    line = next(x for x in reversed(stdout.splitlines()) if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result.update(seconds=time.perf_counter() - start, tree_peak_gb=peak[0] / GIB,
                  load=[load_before, round(os.getloadavg()[0], 1)])
    if result["tree_peak_gb"] > MEMORY_LIMIT_GB:
        print(f"WARNING: stage {stage} peaked at {result['tree_peak_gb']:.1f} GB, over {MEMORY_LIMIT_GB} GB")
    return result


class State:
    """Finished stages and their figures, kept in WORKDIR/real_scale.json (written atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str) -> dict | None:
        return self.data.get(key)

    def put(self, key: str, value: dict) -> None:
        self.data[key] = value
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def forget(self, prefix: str) -> None:
        for key in [k for k in self.data if k == prefix or k.startswith(prefix + ":")]:
            del self.data[key]
        self.put("_", {"updated": time.strftime("%Y-%m-%d %H:%M:%S")})


def test_subset(workdir: Path, n: int, chunk: int | None = None) -> list[Path]:
    """The first n test images (sorted), linked into folders of ``chunk`` cases each (one folder by default)."""
    images = sorted((workdir / "phantom" / "test").glob("*_0000.nii.gz"))[:n]
    chunk = chunk or len(images)
    folders = []
    for i in range(0, len(images), chunk):
        folder = workdir / f"test_{len(images)}" / f"chunk_{i // chunk}_of_{math.ceil(len(images) / chunk)}"
        folder.mkdir(parents=True, exist_ok=True)
        for image in images[i:i + chunk]:
            link = folder / image.name
            if not link.exists():
                link.symlink_to(image.resolve())
        folders.append(folder)
    return folders


def counts_arg(text: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive counts A,B,C, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "work" / "real-scale")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--redo", nargs="+", choices=STAGES, default=[], help="run these stages again")
    parser.add_argument("--planners", nargs="+", choices=PLANNERS, default=list(PLANNERS))
    parser.add_argument("--iterations", type=int, default=3,
                        help="training steps per trainer and planner, after one warm-up step each (default 3)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="training batch size for the train stage (default: the plans'; 1 halves its memory)")
    parser.add_argument("--cases", type=int, default=10, help="test cases to predict per mode (default 10)")
    parser.add_argument("--profile-cases", type=int, default=None, help="cases to profile (default: --cases)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(DEFAULT_MODES),
                        help=f"prediction modes (default: {' '.join(DEFAULT_MODES)})")
    parser.add_argument("--rounds", type=int, default=1, help="prediction rounds (default 1)")
    parser.add_argument("--chunk", type=int, default=5,
                        help="cases per turn: the modes take turns chunk by chunk (default 5; stock's process pools "
                             "start once per chunk)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-subtype", type=counts_arg, metavar="A,B,C",
                        help="phantom training cases per subtype (default: the real 62,106,84)")
    parser.add_argument("--val-per-subtype", type=counts_arg, metavar="A,B,C",
                        help="phantom validation cases per subtype (default: the real 9,15,12)")
    parser.add_argument("--test-cases", type=int, help="phantom test cases (default: the real 72)")
    parser.add_argument("--tiny", action="store_true",
                        help="check the script quickly: small phantom preset, 2/2/2 + 1/1/1 cases, 2 test cases, "
                             "the demo-sized network")
    parser.add_argument("--summary", action="store_true", help="print the recorded figures and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--opts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("nnUNet_def_n_proc", str(min(os.cpu_count() or 1, 4)))
    os.environ.setdefault("nnUNet_compile", "false")
    if args.worker:
        worker_main(args.worker, args.workdir, json.loads(args.opts))
        return

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    state = State(workdir / "real_scale.json")
    log = workdir / "real_scale.log"
    if args.summary:
        from real_scale_report import print_summary

        print_summary(state.data, workdir)
        return
    preset = "small" if args.tiny else "full"
    counts = {"train": [2, 2, 2], "validation": [1, 1, 1], "test": 2} if args.tiny else {}
    for key, value in (("train", args.train_per_subtype), ("validation", args.val_per_subtype),
                       ("test", args.test_cases)):
        if value is not None:
            counts[key] = value
    preset_plans = "demo" if args.tiny else None
    cases = min(args.cases, 2) if args.tiny else args.cases
    for stage in args.redo:
        state.forget(stage)
    if state.get("setup") and state.get("setup") != {"preset": preset, "seed": args.seed, "counts": counts}:
        sys.exit(f"{workdir} holds a rehearsal of {state.get('setup')}; use another --workdir")

    def stage(key: str, name: str, opts: dict) -> dict:
        done = state.get(key)
        if done is not None:
            print(f"== {key}: done earlier ({done['seconds']:.0f} s), reused")
            return done
        print(f"== {key} ...", flush=True)
        result = run_stage(name, workdir, opts, log)
        state.put(key, result)
        print(f"   {result['seconds']:.0f} s, peak {result['tree_peak_gb']:.2f} GB", flush=True)
        return result

    try:
        if "phantom" in args.stages:
            stage("phantom", "phantom", {"preset": preset, "seed": args.seed, "counts": counts})
            state.put("setup", {"preset": preset, "seed": args.seed, "counts": counts})
        if "import" in args.stages:
            stage("import", "import", {})
        if "plan" in args.stages:
            stage("plan", "plan", {"planners": list(PLANNERS), "preset_plans": preset_plans})
        base = {"device": args.device, "preset_plans": preset_plans}
        if "train" in args.stages:
            for planner in args.planners:
                stage(f"train:{planner}", "train", {**base, "planner": planner, "iterations": args.iterations,
                                                    "batch_size": args.batch_size})
        if "validate" in args.stages:
            for planner in args.planners:
                stage(f"validate:{planner}", "validate", {**base, "planner": planner})
        model = state.get("train:default")
        if ("profile" in args.stages or "predict" in args.stages) and model is None:
            sys.exit("no model folder yet: run the train stage for the default planner first")
        if "profile" in args.stages:
            images = test_subset(workdir, args.profile_cases or cases)[0]
            stage("profile", "profile", {**base, "model": model["model_folder"], "images": str(images)})
        if "predict" in args.stages:
            # modes take turns chunk by chunk (and reverse their order every turn), so a change of the machine's
            # load during the hours this takes falls on every mode alike
            chunks = test_subset(workdir, cases, args.chunk)
            turn = 0
            for round_ in range(args.rounds):
                for i, images in enumerate(chunks):
                    for mode in (args.modes if turn % 2 == 0 else args.modes[::-1]):
                        stage(f"predict:{mode}:{round_}:{i}", "predict_mode",
                              {**base, "mode": mode, "model": model["model_folder"], "images": str(images)})
                    turn += 1
    except KeyboardInterrupt:
        sys.exit("interrupted: finished stages are kept in real_scale.json; run again to resume")
    from real_scale_report import print_summary

    print_summary(state.data, workdir)


if __name__ == "__main__":
    main()
