#!/usr/bin/env bash
# GPU checks for a lent GPU machine (device tool). Builds nothing there; under 8 minutes.
#
# Here, once:   make gpu-wheels       (megatron-core for the GPU machine's Python, into build/wheels/)
# Then:         device tool run, carry ["build/wheels"], command:
#               bash benchmarks/gpu_check.sh
# The lent machines have torch, transformers, safetensors, numpy, pillow, but not megatron-core.
# Results: the tables on stdout and $OUT/gpu_check.json; record them in benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE="${TMPDIR:-/tmp}/qvl_site"
if ! python -c "import megatron.core" 2>/dev/null; then
  ls build/wheels/megatron_core-*.whl >/dev/null 2>&1 || { echo "build/wheels is missing: run 'make gpu-wheels' here and carry build/wheels"; exit 2; }
  python -m pip install -q --no-deps --no-index --target "$SITE" build/wheels/megatron_core-*.whl
  export PYTHONPATH="$SITE:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 450 python benchmarks/gpu_check.py --json "${OUT:-/tmp}/gpu_check.json"
