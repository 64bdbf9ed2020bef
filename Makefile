# ladm — make help lists every target.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
CONSTRAINTS := $(VENV)/constraints.txt
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test test-current lint demo train-ddp bench clean

NPROC ?= 2
ARGS ?=

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

install: $(STAMP) ## create $(VENV) and install ladm[dev,slurm,optuna,comet] (torch first, then the versions of requirements.lock)

$(STAMP): pyproject.toml requirements.lock Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) freeze | grep -i '^torch==' > $(CONSTRAINTS)
	grep -iv '^torch==' requirements.lock >> $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev,slurm,optuna,comet]"
	$(PIP) check
	touch $(STAMP)

test: $(STAMP) ## run the test suite (offline, CPU, a few minutes)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q

# The newest releases our ranges admit (transformers 5, peft 0.21, numpy 2, datasets 5, wandb 0.31), without COMET
# (its last release needs transformers<5): a second environment and a fast subset of the suite, so the upper ends
# of pyproject's ranges are tested too.
CURRENT_VENV ?= .venv-current
CURRENT_STAMP := $(CURRENT_VENV)/.installed
CURRENT_SUBSET ?= tests/test_data.py tests/test_schema.py tests/test_tracking.py tests/test_report.py \
	tests/test_ladm.py::test_step_mode_is_exact_under_the_default_clipping tests/test_evaluate.py::test_plain_peft_adapter_and_base_model \
	tests/test_evaluate.py::test_a_rerun_with_another_lr_in_the_same_folder_generates_again tests/test_metrics.py \
	"tests/test_families.py::test_chat_sequences_equal_the_tokenizers_own_template[gemma2-zh-my]" \
	tests/test_mlas.py::test_phi_does_not_depend_on_the_probe_batch_size

$(CURRENT_STAMP): pyproject.toml requirements-current.lock Makefile
	test -x $(CURRENT_VENV)/bin/python || python3 -m venv $(CURRENT_VENV)
	$(CURRENT_VENV)/bin/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(CURRENT_VENV)/bin/python -m pip freeze | grep -i '^torch==' > $(CURRENT_VENV)/constraints.txt
	grep -iv '^torch==' requirements-current.lock >> $(CURRENT_VENV)/constraints.txt
	$(CURRENT_VENV)/bin/python -m pip install -q -c $(CURRENT_VENV)/constraints.txt -e ".[dev,slurm,optuna]"
	touch $(CURRENT_STAMP)

test-current: $(CURRENT_STAMP) ## a fast subset of the suite on the newest releases (requirements-current.lock, no COMET)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline $(CURRENT_VENV)/bin/python -m pytest -q $(CURRENT_SUBSET)

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
