# gptrain — `make demo` and `make test` work on a fresh machine with only Python 3.10+.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PYTHONWARNINGS ?= ignore::FutureWarning
PYTEST := $(PY) -m pytest

DEMO_DIR := runs/demo

.PHONY: install demo test test-unit test-dist test-slurm test-gpu bench lint clean slurm-up slurm-down

install: $(STAMP)

# On a machine without an NVIDIA GPU, pin the CPU torch wheel first: a bare
# `torch` requirement would otherwise pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# install → bundled corpus → prepare → 2-rank CPU training → sample text
demo: install
	$(PY) -m sharding.demo_corpus --out $(DEMO_DIR)/corpus.jsonl
	test -f $(DEMO_DIR)/data/manifest.json || $(VENV)/bin/gptrain prepare \
		$(DEMO_DIR)/corpus.jsonl --out $(DEMO_DIR)/data --train-tokenizer 4096 --val-fraction 0.02
	$(VENV)/bin/gptrain launch configs/demo-cpu.yaml --backend local --nproc-per-node 2
	$(VENV)/bin/gptrain generate $(DEMO_DIR)/train --prompt "Return the" --max-new-tokens 60 \
		--num-return-sequences 2

# One formatter and one linter, both configured in pyproject.toml; CI fails on either.
lint: install
	$(VENV)/bin/ruff format --check launcher training sharding tests bench
	$(VENV)/bin/ruff check launcher training sharding tests bench

# Every layer, each its own pytest run so an empty layer (pytest exit 5) fails loudly:
# unit, dist (2 CPU ranks via torchrun), slurm (a real local cluster, started and
# stopped here; needs root for apt and the daemons). gpu tests skip without a GPU.
test: lint test-unit test-dist test-slurm test-gpu

test-unit: install
	$(PYTEST) -m "not dist and not slurm and not gpu"

test-dist: install
	$(PYTEST) -m dist

test-slurm: install
	slurm/start.sh
	$(PYTEST) -m slurm; rc=$$?; slurm/stop.sh; exit $$rc

test-gpu: install
	$(PYTEST) -m gpu

bench: install
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

slurm-up:
	slurm/start.sh

slurm-down:
	slurm/stop.sh

clean:
	rm -rf $(VENV) .cache runs .pytest_cache .ruff_cache
