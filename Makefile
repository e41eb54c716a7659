# qvl-train: `make demo` trains a tiny Qwen2-VL on CPU; `make test` runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCHRUN := $(VENV)/bin/torchrun
SYNTH := data/synth
VALID := data/synth_valid
DEMO_OUT ?= outputs/demo
NPROC ?= 2

.PHONY: setup data demo test lint gpu-wheels clean

REF_VENV ?= .venv-ref

setup: $(VENV)/.installed $(REF_VENV)/.installed

# torch is pinned to the CPU build through constraints.txt (an unpinned torch pulls a CUDA build).
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	@touch $@

# The Qwen3.5/3.6 reference (transformers 5.x) in its own pinned environment; parity runs it in a subprocess.
$(REF_VENV)/.installed: constraints-ref.txt
	@test -x $(REF_VENV)/bin/python || python3 -m venv $(REF_VENV)
	$(REF_VENV)/bin/python -m pip install -q --upgrade pip
	$(REF_VENV)/bin/python -m pip install -q -r constraints-ref.txt
	@touch $@

data: $(SYNTH)/index.json $(VALID)/index.json

$(SYNTH)/index.json: | setup
	$(PY) -m data_pipelines.synth --out $(SYNTH) --num-samples 2000 --seed 0

# held-out questions of the same factory (another seed): the demo's evaluation
$(VALID)/index.json: | setup
	$(PY) -m data_pipelines.synth --out $(VALID) --num-samples 200 --seed 1

demo: setup data
	rm -rf $(DEMO_OUT)
	$(TORCHRUN) --nproc_per_node=$(NPROC) launch/train.py +experiment=tiny output_dir=$(DEMO_OUT) \
	  eval.every=50 eval.max_batches=4 'data.valid=[{path:$${cluster.data_root}/synth_valid}]'
	$(PY) -m qvl_train.monitor.summary $(DEMO_OUT)

test: setup data lint
	$(PY) -m pytest -q --durations=40 tests

# ruff (rules in pyproject.toml [tool.ruff]): pyflakes, import order, pycodestyle at 140 columns; `make test` runs it first
lint: setup
	$(PY) -m ruff check qvl_train data_pipelines launch tests benchmarks

# Wheels that benchmarks/gpu_check.sh installs on a lent GPU machine (Python 3.12 there, no index):
# megatron-core, the transformers stack the parity reference is pinned to (constraints.txt), and the
# runtime requirements of DeepSpeed (the HF + ZeRO-2 baseline of the throughput check) besides torch/numpy.
GPU_WHEELS := megatron-core==0.16.1 transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.2 \
  hjson==3.1.0 py-cpuinfo==9.0.0 msgpack==1.2.4 einops==0.8.2 ninja==1.13.2 psutil==7.2.2 packaging==26.4 \
  tqdm==4.70.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0
DEEPSPEED := deepspeed==0.19.8
gpu-wheels: setup
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
	  -d build/wheels $(GPU_WHEELS)
	@# DeepSpeed is an sdist only: built here without its ops (they would need nvcc); the wheel must be pure Python
	rm -f build/wheels/deepspeed-*.whl
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w build/wheels $(DEEPSPEED)
	@ls build/wheels/deepspeed-*-py3-none-any.whl >/dev/null || { echo "deepspeed did not build as a py3-none-any wheel"; exit 1; }

clean:
	rm -rf outputs $(SYNTH) $(VALID)
