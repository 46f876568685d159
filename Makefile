# remask: `make test` and `make train` on a fresh clone build .venv from requirements.txt first.
# `make ... PYTHON=/path/to/python` uses an interpreter that already has torch (e.g. a GPU box) instead.
PYTHON ?= .venv/bin/python
VENV_PYTHON := .venv/bin/python
# The venv is a prerequisite only when it is the interpreter in use.
ENV := $(if $(filter $(VENV_PYTHON),$(PYTHON)),.venv/installed)
ARGS ?=
GPU_CHECK_REPORT ?= gpu-check.md

.PHONY: help test train bench gpu-check data model quantize eval compare clean

help:
	@echo "make test                      run the test suite (builds .venv on first use)"
	@echo "make train [ARGS='--flag ...']  fine-tune; no ARGS = the embedded CPU demo"
	@echo "make bench                     throughput benchmarks on the current device"
	@echo "make gpu-check                 on a GPU: the GPU tests, 3B step/offload/decode against the plan and"
	@echo "                               transformers, in $(GPU_CHECK_REPORT) (under 10 min on one H100)"
	@echo "make data                      download the recipe's datasets and GSM8K into data/"
	@echo "make model MODEL=org/name[@rev]  download a model from the Hugging Face Hub into its cache (prints its path)"
	@echo "make quantize MODEL=DIR OUT=DIR  LLM.int8 8-bit copy of a checkpoint (MODEL may be org/name on the Hub)"
	@echo "make eval MODEL=DIR [DATA=data]  the card's table: GSM8K 5-shot strict-match, ARC-Challenge 25-shot acc_norm"
	@echo "make compare [ARGS='--seeds N']  SFT vs Masked Thought vs ReMask on the embedded task: 6 epochs over 2048"
	@echo "                               examples, 8 seeds, paired 95% intervals and sign tests, curves.svg (about an"
	@echo "                               hour on 2 cores); --seeds 20-39: a part; remask.py compare-report pools parts"

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

# Into the Hugging Face cache ($$HF_HUB_CACHE, else $$HF_HOME/hub, else ~/.cache/huggingface/hub), shared with transformers.
model: $(ENV)
	@test -n "$(MODEL)" || { echo "usage: make model MODEL=org/name[@revision]"; exit 2; }
	$(PYTHON) data.py download $(MODEL) $(ARGS)

quantize: $(ENV)
	@test -n "$(MODEL)" -a -n "$(OUT)" || { echo "usage: make quantize MODEL=IN_DIR|org/name OUT=OUT_DIR"; exit 2; }
	$(PYTHON) quantize.py $(MODEL) $(OUT) $(ARGS)

# Both columns of the card's table; the per-question rows land beside the model directory (MODEL-gsm8k.jsonl, ...).
EVAL_DATA = $(or $(DATA),data)
# A directory: beside it; a Hub id (org/name): under eval/ as org--name-gsm8k.jsonl, ...
EVAL_OUT = $(if $(wildcard $(MODEL)/.),$(patsubst %/,%,$(MODEL)),eval/$(subst /,--,$(MODEL)))
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
