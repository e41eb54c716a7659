#!/usr/bin/env bash
# GPU checks for a lent GPU machine (device tool). Builds nothing there; under 8 minutes.
#
# Here, once:   make gpu-wheels       (megatron-core for the GPU machine's Python, into build/wheels/)
# Then:         device tool run, carry ["build/wheels"], command:
#               bash benchmarks/gpu_check.sh
# The lent machines have torch, safetensors, numpy, pillow, but not megatron-core, and a transformers
# other than the pinned parity reference: the wheels from build/wheels go first on PYTHONPATH.
# Results: the tables on stdout and $OUT/gpu_check.json; record them in benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE="${TMPDIR:-/tmp}/qvl_site"
ls build/wheels/megatron_core-*.whl >/dev/null 2>&1 || { echo "build/wheels is missing: run 'make gpu-wheels' here and carry build/wheels"; exit 2; }
python -m pip install -q --upgrade --no-deps --no-index --no-compile --target "$SITE" build/wheels/*.whl
export PYTHONPATH="$SITE:${PYTHONPATH:-}"
python -c "import megatron.core, transformers; print('megatron-core', megatron.core.__version__, 'transformers', transformers.__version__)"
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 450 python benchmarks/gpu_check.py --json "${OUT:-/tmp}/gpu_check.json"
