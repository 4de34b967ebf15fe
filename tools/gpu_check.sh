#!/usr/bin/env bash
# The GPU check of memory and speed (issue 12, with issue 11's precision checks): one JSON file of figures.
#
#   bash tools/gpu_check.sh [--out FILE] [--skip-trl]     # one CUDA GPU (H100/H200: ~6 minutes)
#   bash tools/gpu_check.sh --cpu [--out FILE]            # the same code on the tiny model on CPU (~1 minute)
#
# Needs Python >= 3.10 with torch (CUDA), transformers 5.x, peft and accelerate, as a GPU image has them; no network.
# Pure-Python dependencies the image lacks (tools/gpu_wheels.txt: hydra-core, omegaconf, datasets, trl, ...) are
# installed from tools/wheels/ into .gpu-site/ (put first on PYTHONPATH; the image's packages are never touched).
# Fill tools/wheels/ on a machine with network first: `make gpu-wheels` (Python 3.12 manylinux wheels, 67 MB,
# git-ignored; only the lines whose module the GPU machine lacks are used, so the others, e.g. pyarrow's 55 MB,
# can be left behind). With network and no tools/wheels/, they come from PyPI. What it measures and the targets
# it checks: tools/gpu_check.py; results: docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then :; elif [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

missing=()
while read -r requirement module _; do
  case "$requirement" in ''|'#'*) continue ;; esac
  "$PYTHON" -c "import $module" 2>/dev/null || missing+=("$requirement")
done < tools/gpu_wheels.txt
if [ ${#missing[@]} -gt 0 ]; then
  echo "gpu_check: installing ${missing[*]} into .gpu-site/" >&2
  if [ -d tools/wheels ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --find-links tools/wheels --target .gpu-site "${missing[@]}"
  else
    "$PYTHON" -m pip install -q --no-deps --target .gpu-site "${missing[@]}"
  fi
fi
export PYTHONPATH="$PWD/.gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" tools/gpu_check.py "$@"
