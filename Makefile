# ladm — make help lists every target.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
CONSTRAINTS := $(VENV)/constraints.txt
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test lint demo train-ddp bench clean

NPROC ?= 2
ARGS ?=

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

install: $(STAMP) ## create $(VENV) and install ladm[dev,slurm,optuna] (torch first, then the versions of requirements.lock)

$(STAMP): pyproject.toml requirements.lock Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) freeze | grep -i '^torch==' > $(CONSTRAINTS)
	grep -iv '^torch==' requirements.lock >> $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev,slurm,optuna]"
	$(PIP) check
	touch $(STAMP)

test: $(STAMP) ## run the test suite (offline, CPU, a few minutes)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q

lint: $(STAMP) ## ruff over ladm/, tests/ and benchmarks/
	$(VENV)/bin/ruff check ladm tests benchmarks

demo: $(STAMP) ## the main job: tiny-llama3 zh→lo, zero_shot vs lora, offline on CPU, then the report
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/ladm-train --multirun experiment=demo
	$(VENV)/bin/ladm-report multirun/demo

train-ddp: $(STAMP) ## data-parallel training on this box: make train-ddp NPROC=8 ARGS="model=qwen2.5-7b ..."
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m ladm.train $(ARGS)

bench: $(STAMP) ## speed benchmarks (ratios measured in one process)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) benchmarks/bench_eval.py
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) benchmarks/bench_ladm.py
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) benchmarks/bench_loss.py

clean: ## remove run outputs (keeps $(VENV))
	rm -rf multirun outputs wandb
