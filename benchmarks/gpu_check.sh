#!/usr/bin/env bash
# GPU checks for a lent GPU machine (device tool). Builds nothing there; under 8 minutes.
#
# Here, once:   make gpu-wheels       (megatron-core, transformers, a pure-Python deepspeed wheel and its
#                                      requirements for the GPU machine's Python, into build/wheels/)
# Then:         device tool run, carry ["build/wheels"], command:
#               bash benchmarks/gpu_check.sh
# The lent machines have torch, safetensors, numpy, pillow, but not megatron-core, and a transformers
# other than the pinned parity reference, and no DeepSpeed: the wheels from build/wheels go first on
# PYTHONPATH. DeepSpeed runs with torch's AdamW (no FusedAdam), so it JIT-builds none of its ops.
# Results: the tables on stdout and $OUT/gpu_check.json; record them in benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE="${TMPDIR:-/tmp}/qvl_site"
ls build/wheels/megatron_core-*.whl build/wheels/deepspeed-*.whl >/dev/null 2>&1 || { echo "build/wheels is missing or old: run 'make gpu-wheels' here and carry build/wheels"; exit 2; }
python -m pip install -q --upgrade --no-deps --no-index --no-compile --target "$SITE" build/wheels/*.whl
export PYTHONPATH="$SITE:${PYTHONPATH:-}"
python -c "import megatron.core, transformers; print('megatron-core', megatron.core.__version__, 'transformers', transformers.__version__)"
python -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1 || echo "(the HF + DeepSpeed row will say why)"
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 450 python benchmarks/gpu_check.py --json "${OUT:-/tmp}/gpu_check.json"
