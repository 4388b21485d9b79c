"""Does fitting the head's temperature on shifted validation cases keep its confidence honest on other sites?

For each bench/classification.py run trained on one site: the validation cases under the acquisition shifts of
training/shift_calibration.py are predicted once (stored in the fold's records as ``validation_shifted``, exactly as
training with ``--shift-calibration yes`` stores them), then the head's temperature is fitted as the product fits
it, on the validation cases alone and on them with their shifted copies, and both are applied to the run's stored
test logits at every test site. Macro-F1 does not move with a temperature; ECE, NLL and how sure the wrong answers
are do. Paired bootstrap over the same cases.

  python bench/shift_calibration.py --workdir /work/bench_cls --runs A_long A_long_imperfect_attention --sites B A C
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from classification import BOOTSTRAP, DATASET_BASE_ID, SITES_DEFAULT, bootstrap, ece, macro_f1  # noqa: E402


def model_folder(workdir: Path, run: str) -> tuple[Path, int, str]:
    """A run's model folder, dataset id and plans identifier (runs are ``<site><tag>``: A_long, A_long_t2)."""
    from nnunet_mtl.planning.plans import PLANS_CHOICES

    site, tag = run[0], run[1:]
    dataset_id = DATASET_BASE_ID + SITES_DEFAULT.index(site)
    plans = f"{PLANS_CHOICES['demo']}{tag}"
    return (workdir / "nnunet" / "nnUNet_results" / f"Dataset{dataset_id}_Site{site}"
            / f"nnUNetTrainerMTL__{plans}__3d_fullres", dataset_id, plans)


def ensure_shifted_records(workdir: Path, run: str) -> dict:
    """The fold's records, with ``validation_shifted`` predicted now by the final weights if it is missing."""
    import torch

    from nnunet_mtl import paths
    from nnunet_mtl.training.run import build_trainer
    from nnunet_mtl.training.subtype_fit import load_records, save_records

    model, dataset_id, plans = model_folder(workdir, run)
    fold = model / "fold_0"
    records = load_records(fold)
    if records.get("validation_shifted"):
        return records
    paths.configure(workdir / "nnunet")
    trainer = build_trainer(dataset_id, plans, 0, "cpu")
    trainer.initialize()
    trainer.load_weights_for_validation(fold / "checkpoint_final.pth")  # the weights its validation used
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    print(f"== {run}: validation cases under acquisition shifts", flush=True)
    with torch.no_grad():
        save_records(fold, "validation_shifted", trainer.shifted_validation_records())
    return load_records(fold)


def wrong_confidence(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Median probability of the wrong answers, and the share of them above 0.9."""
    wrong = p.argmax(1) != y
    if not wrong.any():
        return float("nan"), float("nan")
    top = p.max(1)[wrong]
    return float(np.median(top)), float((top > 0.9).mean())


def nll(y: np.ndarray, p: np.ndarray) -> float:
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1)).mean())


def main() -> None:
    from nnunet_mtl.inference.outputs import read_details
    from nnunet_mtl.model.subtype_classifier import softmax
    from nnunet_mtl.training.subtype_fit import fit_classifier

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="bench/classification.py's workdir")
    parser.add_argument("--runs", nargs="+", required=True, help="runs trained on one site (A_long, A_long_t2, ...)")
    parser.add_argument("--sites", nargs="+", default=list(SITES_DEFAULT))
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    os.environ.setdefault("nnUNet_n_proc_DA", "2")
    workdir = args.workdir.resolve()
    names = [f"subtype{k}" for k in range(3)]
    out = {}
    for run in args.runs:
        records = ensure_shifted_records(workdir, run)
        clean = fit_classifier([], records["validation"], names, source="clean")
        shifted = fit_classifier([], records["validation"], names, source="shifted",
                                 shifted=records["validation_shifted"])
        temperatures = {"clean": clean.cnn_temperature, "shifted": shifted.cnn_temperature}
        print(f"\n{run}: head temperature on {len(records['validation'])} validation cases {temperatures['clean']:.2f}"
              f", with {len(records['validation_shifted'])} shifted copies {temperatures['shifted']:.2f}; held-out "
              f"head under the shifts: {json.dumps(shifted.validation.get('cnn_shifted_raw'))}")
        print(f"{'site':<6}{'T':<9}{'macro-F1':>8}{'ECE':>24}{'NLL':>24}{'wrong: median p':>17}{'> 0.9':>7}")
        out[run] = {"temperatures": temperatures, "sites": {}}
        for site in args.sites:
            details = read_details(workdir / f"preds_{run}_on_{site}")
            summary = json.loads((workdir / f"phantom_{site}" / "phantom.json").read_text())
            truth = {c["name"]: c["subtype"] for c in summary["cases"] if c["split"] == "test"}
            cases = sorted(details)
            y = np.array([truth[c] for c in cases])
            logits = np.array([np.mean(details[c]["fold_logits"], axis=0) for c in cases])
            probabilities = {k: softmax(logits / t) for k, t in temperatures.items()}
            rows = {}
            for k, p in probabilities.items():
                rows[k] = {"macro_f1": float(macro_f1(y, p)), "ece": bootstrap(y, p, ece),
                           "nll": bootstrap(y, p, nll), "wrong": wrong_confidence(y, p)}
                e, n, (median, above) = rows[k]["ece"], rows[k]["nll"], rows[k]["wrong"]
                print(f"{site:<6}{k + f' {temperatures[k]:.2f}':<9}{rows[k]['macro_f1']:>8.3f}"
                      f"{e[0]:>8.3f} [{e[1]:.3f}, {e[2]:.3f}]{n[0]:>8.3f} [{n[1]:.3f}, {n[2]:.3f}]"
                      f"{median:>17.3f}{above:>7.2f}")
            both = np.stack([probabilities["clean"], probabilities["shifted"]], axis=1)
            for label, statistic in (("ECE", ece), ("NLL", nll)):
                d = bootstrap(y, both, lambda yy, pq, s=statistic: s(yy, pq[:, 1]) - s(yy, pq[:, 0]))
                rows[f"{label}_difference"] = d
                print(f"      shifted - clean {label}: {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] "
                      f"({BOOTSTRAP} paired resamples)")
            out[run]["sites"][site] = rows
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
