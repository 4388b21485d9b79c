#!/usr/bin/env bash
# The prepared CUDA check for a lent GPU machine (the `device` tool of this workplace), whose image has PyTorch
# but not nnU-Net: the missing wheels travel in .whl/ (SimpleITK alone in .whl_sitk/, in a first call, to stay
# under the transfer limit) and are installed into /tmp/site. bench/gpu_check.py says what it measures; the whole
# check stops after 8 minutes, its figures so far in $OUT.
#   call 1: bash bench/gpu_check.sh sitk      (carry .whl_sitk)
#   call 2: bash bench/gpu_check.sh           (carry .whl)
#   dry run on a CPU machine with the project's venv: python bench/gpu_check.py --device cpu --tiny
set -euo pipefail
pip_target() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation \
  --upgrade --target /tmp/site "$@"; }
if [ "${1:-}" = sitk ]; then
  pip_target .whl_sitk/*.whl
  python3 -c "import sys; sys.path.insert(0, '/tmp/site'); import SimpleITK; print('SimpleITK', SimpleITK.Version())"
  exit 0
fi
pip_target .whl/*.whl .whl/*.tar.gz
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv || true
timeout 470 python3 bench/gpu_check.py "$@"
