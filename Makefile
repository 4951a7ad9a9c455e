# shardlab: `make train` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# A GPU user overrides this, e.g. make TORCH_SPEC="torch==2.13.0 --index-url <cuda wheel index>" install
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The torch spec installed, remembered by a stamp named after it: another TORCH_SPEC installs torch again,
# with --force-reinstall once a torch is there (a local CPU wheel would otherwise satisfy torch==2.13.0 of
# a CUDA index), and the install ends by saying which torch it has.
TORCH_STAMP := $(VENV)/.torch-$(shell printf '%s' '$(TORCH_SPEC)' | cksum | cut -d' ' -f1)
ARGS ?=

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(TORCH_STAMP):
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if $(PY) -c "import torch" 2>/dev/null; then $(PY) -m pip install -q --force-reinstall $(TORCH_SPEC); else $(PY) -m pip install -q $(TORCH_SPEC); fi
	rm -f $(VENV)/.torch-*
	touch $@

# torchao's PyPI wheel carries C++ extensions built for CUDA torch (they link libc10_cuda.so): beside a CPU build of
# torch they cannot load, and torchao says so on every import (transformers imports it too). On a CPU torch the
# install removes them; nothing on a CPU calls them. On a CUDA torch they stay.
define TORCHAO_CPU
import importlib.util, pathlib, torch
root = pathlib.Path(importlib.util.find_spec("torchao").origin).parent
cuda_only = [p for p in sorted(root.glob("_C*.so")) if b"libc10_cuda" in p.read_bytes()]
if torch.version.cuda is None and cuda_only:
    for p in cuda_only:
        p.unlink()
    print("shardlab: removed torchao's CUDA-only extensions (a CPU torch cannot load them):", ", ".join(p.name for p in cuda_only))
endef
export TORCHAO_CPU

$(STAMP): pyproject.toml $(TORCH_STAMP)
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(d for d in p['dependencies'] + p['optional-dependencies']['dev'] if not d.startswith('torch==')))" > $(VENV)/requirements.txt
	$(PY) -m pip install -q -r $(VENV)/requirements.txt
	$(PY) -c "$$TORCHAO_CPU"
	$(PY) -c "import torch; print('shardlab: torch', torch.__version__, 'with CUDA', torch.version.cuda) if torch.version.cuda else print('shardlab: torch', torch.__version__, '(CPU build)')"
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the dependencies from pyproject.toml

RAY_STAMP := $(VENV)/.installed-ray
$(RAY_STAMP): pyproject.toml $(STAMP)
	$(PY) -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['ray']))" > $(VENV)/requirements-ray.txt
	$(PY) -m pip install -q -r $(VENV)/requirements-ray.txt
	touch $(RAY_STAMP)

install-ray: $(RAY_STAMP) ## the optional Ray extra (hydra/launcher=ray): Ray Train and Hydra's Ray launcher

train: $(STAMP) ## train the default config (native Llama, embedded text corpus) and print a summary
	$(PY) train.py $(ARGS)

test: $(STAMP) $(RAY_STAMP) ## run the test suite (two workers, whole files each: see README)
	$(PY) -m pytest -q -n 2 --dist loadfile $(ARGS)

sweep: $(STAMP) ## a CPU-sized sweep (strategy x precision x attention); report in multirun/<date>/<time>/
	$(PY) train.py -m +sweep=cpu $(ARGS)

bench: $(STAMP) ## framework overhead vs a raw PyTorch loop, ddp and fsdp on 2 processes
	$(VENV)/bin/torchrun --nproc_per_node=2 -m benchmarks.overhead --strategy ddp
	$(VENV)/bin/torchrun --nproc_per_node=2 -m benchmarks.overhead --strategy fsdp

gpu-check: $(STAMP) ## on one GPU: MFU, fp8, attention memory, planner vs CUDA allocator, nccl; appends benchmarks/RESULTS.md
	$(PY) -m benchmarks.gpu_check $(ARGS)

gpu-check-dry: $(STAMP) ## the same, every step with tiny shapes on the CPU (writes nothing)
	$(PY) -m benchmarks.gpu_check --dry-run $(ARGS)

# A GPU machine with its own Python 3.12 and torch but no network: the packages it lacks, as wheels for it
# (antlr4-python3-runtime 4.9.3, omegaconf's parser, exists only as a pure-Python source archive).
GPU_WHEELS := hydra-core==1.3.8 omegaconf==2.3.0 torchao==0.18.0
gpu-wheels: $(STAMP) ## what a bare GPU machine's Python 3.12 lacks, into .whl/ (git-ignored)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl $(GPU_WHEELS)
	$(PY) -m pip download -q --no-deps --no-binary=:all: -d .whl antlr4-python3-runtime==4.9.3

lint: $(STAMP) ## ruff on the code, hadolint on the Dockerfile
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

format: $(STAMP) ## ruff format and autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean: ## remove run outputs (outputs/, multirun/)
	rm -rf outputs multirun

.PHONY: help install install-ray train test sweep bench gpu-check gpu-check-dry gpu-wheels lint format clean
