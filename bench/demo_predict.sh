#!/usr/bin/env bash
# The demo's prediction stage (36 test cases, fast mode, the demo's engine choice) of a finished demo, timed by the
# demo itself, for one or two source trees alternated (e.g. main and a branch), twice.
#   bench/demo_predict.sh WORK [SRC_A [SRC_B]]     WORK: a finished `make demo` workdir; SRC_*: a clone's src/
# Each run copies WORK's phantom and nnU-Net folders (not its predictions) to a temporary folder, so the demo reuses
# phantom, import, plan and train and predicts, evaluates and reports again. Prints the stage time and the metrics.
set -euo pipefail
work=$(realpath "$1"); shift
trees=("${@:-$(realpath "$(dirname "$0")/../src")}")
python=${PYTHON:-$(realpath "$(dirname "$0")/../.venv/bin/python")}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for round in 1 2; do
  for tree in "${trees[@]}"; do
    run="$tmp/run"; rm -rf "$run"; mkdir -p "$run"
    for d in phantom nnUNet_raw nnUNet_preprocessed nnUNet_results; do cp -r "$work/$d" "$run/"; done
    rm -rf "$run"/nnUNet_results/*/*/engine_cache
    log="$tmp/log"
    PYTHONPATH="$tree" "$python" -m nnunet_mtl.cli demo --workdir "$run" > "$log" 2>&1
    echo "round $round $tree: $(grep -E '^ +predict test \(fast\) ' "$log" | tail -1 | tr -s ' ')," \
         "$(grep -o "test set (phantom, case level).*" "$log"), load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
