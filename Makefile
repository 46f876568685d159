# remask: `make test` and `make train` on a fresh clone build .venv from requirements.txt first.
# `make ... PYTHON=/path/to/python` uses an interpreter that already has torch (e.g. a GPU box) instead.
PYTHON ?= .venv/bin/python
VENV_PYTHON := .venv/bin/python
# The venv is a prerequisite only when it is the interpreter in use.
ENV := $(if $(filter $(VENV_PYTHON),$(PYTHON)),.venv/installed)
ARGS ?=
GPU_CHECK_REPORT ?= gpu-check.md

.PHONY: help test train bench gpu-check data quantize eval compare clean

help:
	@echo "make test                      run the test suite (builds .venv on first use)"
	@echo "make train [ARGS='--flag ...']  fine-tune; no ARGS = the embedded CPU demo"
	@echo "make bench                     throughput benchmarks on the current device"
	@echo "make gpu-check                 on a GPU: the GPU tests, 3B step/offload/decode against the plan and"
	@echo "                               transformers, in $(GPU_CHECK_REPORT) (under 10 min on one H100)"
	@echo "make data                      download the recipe's datasets and GSM8K into data/"
	@echo "make quantize MODEL=DIR OUT=DIR  LLM.int8 8-bit copy of a checkpoint"
	@echo "make eval MODEL=DIR [DATA=data]  the card's table: GSM8K 5-shot strict-match, ARC-Challenge 25-shot acc_norm"
	@echo "make compare [ARGS='--seeds N']  SFT vs Masked Thought vs ReMask on the embedded task: 6 epochs over 1408"
	@echo "                               examples, 5 seeds, paired 95% intervals, curves.svg (26 min on 2 cores)"

.venv/installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install --upgrade -r requirements.txt
	touch $@

test: $(ENV)
	$(PYTHON) -m pytest

train: $(ENV)
	$(PYTHON) remask.py train $(ARGS)

bench: $(ENV)
	$(PYTHON) tests/bench.py $(ARGS)

# Everything that waits for a GPU, in one report (ARGS='--budget S' bounds it); without CUDA one line and exit 1.
# On a GPU box without the venv: make gpu-check PYTHON=python3
gpu-check: $(ENV)
	@$(PYTHON) tests/gpu_check.py --report $(GPU_CHECK_REPORT) $(ARGS)

data: $(ENV)
	$(PYTHON) data.py download all --out data

quantize: $(ENV)
	@test -n "$(MODEL)" -a -n "$(OUT)" || { echo "usage: make quantize MODEL=IN_DIR OUT=OUT_DIR"; exit 2; }
	$(PYTHON) quantize.py $(MODEL) $(OUT) $(ARGS)

# Both columns of the card's table; the per-question rows land beside the model directory (MODEL-gsm8k.jsonl, ...).
EVAL_DATA = $(or $(DATA),data)
EVAL_OUT = $(patsubst %/,%,$(MODEL))
eval: $(ENV)
	@test -n "$(MODEL)" || { echo "usage: make eval MODEL=DIR [DATA=data]"; exit 2; }
	$(PYTHON) remask.py eval gsm8k --model $(MODEL) --data $(EVAL_DATA)/gsm8k-test.jsonl \
		--fewshot-data $(EVAL_DATA)/gsm8k-train.jsonl --output $(EVAL_OUT)-gsm8k.jsonl $(ARGS)
	$(PYTHON) remask.py eval arc --model $(MODEL) --data $(EVAL_DATA)/ARC-Challenge-test.jsonl \
		--fewshot-data $(EVAL_DATA)/ARC-Challenge-train.jsonl --output $(EVAL_OUT)-arc-challenge.jsonl $(ARGS)

compare: $(ENV)
	$(PYTHON) remask.py compare $(ARGS)

clean:
	rm -rf .venv .pytest_cache __pycache__ tests/__pycache__
