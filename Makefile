# The two commands of the README:
#   make demo   set up .venv (first time) and run the demo
#   make test   set up .venv (first time), lint (ruff, config in pyproject.toml), run the test suite (what CI runs)
#   make gpu-wheels   build here the wheels gpu-check installs on a torch-only Python 3.12 machine
#   make gpu-check    on a machine with one CUDA GPU: install them, train 20 steps, bench, write JSON
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint gpu-wheels gpu-check gpu-check-dry-run

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,eval]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m tools.demo

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q --durations=30

# The lent GPU machines have Python 3.12 and torch 2.11 only, and no network: carry every other
# wheel. deepspeed is an sdist (built here into a pure-Python wheel, ops JIT-built there).
GPU_WHEELS ?= dist/gpu-wheels
GPU_PY ?= 3.12
gpu-wheels: $(STAMP)
	$(PY) -m pip wheel --quiet --no-deps -w $(GPU_WHEELS) . deepspeed==0.19.8
	$(PY) -m pip download --quiet --only-binary=:all: --python-version $(GPU_PY) --platform manylinux2014_x86_64 \
		--platform manylinux_2_28_x86_64 -d $(GPU_WHEELS) megatron-core==0.16.1 omegaconf transformers safetensors \
		tokenizers tqdm numpy fsspec datasets wandb matplotlib hjson ninja packaging psutil py-cpuinfo pydantic msgpack einops

gpu-check:
	python3 tools/gpu_check.py --wheels $(GPU_WHEELS) --out gpu_check.json

gpu-check-dry-run:
	python3 tools/gpu_check.py --wheels $(GPU_WHEELS) --out gpu_check.json --dry-run
