# ladm — make help lists every target.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
CONSTRAINTS := $(VENV)/constraints.txt
STAMP := $(VENV)/.installed
COMET_VENV ?= .venv-comet
COMET_STAMP := $(COMET_VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test test-lower lint demo compare train-ddp bench bench-gpu clean

NPROC ?= 2
ARGS ?=

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

install: $(STAMP) $(COMET_STAMP) ## .venv: ladm[dev,slurm,optuna,gemma3] on requirements.lock (current releases); .venv-comet: COMET's environment (requirements-comet.lock)

$(STAMP): pyproject.toml requirements.lock Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) freeze | grep -i '^torch==' > $(CONSTRAINTS)
	grep -iv '^torch==' requirements.lock >> $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev,slurm,optuna,gemma3]"
	$(PIP) check
	touch $(STAMP)

# unbabel-comet 2.2.7, its last release, needs transformers<5 and numpy<2: it lives in its own environment, which
# .venv scores COMET through (ladm/comet_worker.py). That environment holds ladm too, at the lower ends of
# pyproject's ranges (transformers 4.57, peft 0.18, numpy 1.26), so `make test-lower` tests those ends.
LOWER_SUBSET ?= tests/test_metrics.py tests/test_data.py tests/test_schema.py tests/test_report.py \
	tests/test_ladm.py::test_step_mode_is_exact_under_the_default_clipping tests/test_evaluate.py::test_plain_peft_adapter_and_base_model \
	tests/test_evaluate.py::test_a_rerun_with_another_lr_in_the_same_folder_generates_again \
	"tests/test_families.py::test_chat_sequences_equal_the_tokenizers_own_template[llama3-zh-lo]" \
	tests/test_families.py::test_newline_stop_is_built_once_and_stops_like_transformers_stop_strings \
	tests/test_mlas.py::test_phi_does_not_depend_on_the_probe_batch_size tests/test_tracking.py

$(COMET_STAMP): pyproject.toml requirements-comet.lock Makefile
	test -x $(COMET_VENV)/bin/python || python3 -m venv $(COMET_VENV)
	$(COMET_VENV)/bin/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(COMET_VENV)/bin/python -m pip freeze | grep -i '^torch==' > $(COMET_VENV)/constraints.txt
	grep -iv '^torch==' requirements-comet.lock >> $(COMET_VENV)/constraints.txt
	$(COMET_VENV)/bin/python -m pip install -q -c $(COMET_VENV)/constraints.txt -e ".[dev,slurm,optuna,comet]"
	$(COMET_VENV)/bin/python -m pip check
	touch $(COMET_STAMP)

test: $(STAMP) $(COMET_STAMP) ## run the test suite (offline, CPU; COMET through .venv-comet)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q

test-lower: $(COMET_STAMP) ## a fast subset of the suite at the lower ends of the ranges (.venv-comet, COMET in process)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline $(COMET_VENV)/bin/python -m pytest -q $(LOWER_SUBSET)

lint: $(STAMP) ## ruff over ladm/, tests/ and benchmarks/
	$(VENV)/bin/ruff check ladm tests benchmarks

demo: $(STAMP) ## the main job: real Gemma-3-270M, zh→th, zero_shot vs lora vs ladm, offline on CPU (~10 min), then the report
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/ladm-train --multirun experiment=demo
	$(VENV)/bin/ladm-report multirun/demo

COMPARE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/ladm-train --multirun experiment=real_comparison
compare: $(STAMP) ## the committed real-weights comparison: gemma3-270m, zh→id and zh→lo, five methods, two seeds (~2 h on 2 cores) → results/real_comparison
	$(COMPARE)
	$(COMPARE) method=ladm strength=s1
	$(COMPARE) method=landermt pair=zh-id 'method.pairs=[zh-id,zh-lo]' method.split=ratio
	$(VENV)/bin/ladm-report results/real_comparison --no-wandb

train-ddp: $(STAMP) ## data-parallel training on this box: make train-ddp NPROC=8 ARGS="model=qwen2.5-7b ..."
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m ladm.train $(ARGS)

BENCH := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) benchmarks
bench: $(STAMP) ## every README benchmark figure (ratios in one process), on tiny-llama3 and the real gemma3-270m (~1.5 h on 2 cores)
	$(BENCH)/bench_train.py
	$(BENCH)/bench_train.py --model gemma3-270m --steps 4 --rounds 2
	$(BENCH)/bench_startup.py --model gemma3-270m
	$(BENCH)/bench_eval.py
	$(BENCH)/bench_eval.py --model gemma3-270m --sentences 32 --rounds 1
	$(BENCH)/bench_ladm.py
	$(BENCH)/bench_ladm.py --model gemma3-270m --steps 2 --rounds 3
	$(BENCH)/bench_loss.py
	$(BENCH)/bench_padding.py
	$(BENCH)/bench_stop.py --model tiny-llama3 --pair zh-km --max-new-tokens 64
	$(BENCH)/bench_stop.py --model gemma3-270m --pair zh-th

bench-gpu: $(STAMP) ## the README's GPU table on this machine's GPU (Llama-3.1-8B shape, random bf16 weights; < 8 min on an H100/H200)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) benchmarks/bench_gpu.py --out bench_gpu.json

clean: ## remove run outputs (keeps $(VENV))
	rm -rf multirun outputs wandb
