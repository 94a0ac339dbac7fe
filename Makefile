# `make demo` and `make test` work on a fresh machine with Python 3.10+ and pip: they create (or reuse) a virtual
# environment keyed by the hash of requirements.txt and requirements-dev.txt, so an unchanged environment is never
# reinstalled.
PYTHON ?= python3
REQ_HASH := $(shell cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-12)
VENV ?= $(HOME)/.cache/dinossl/venv-$(REQ_HASH)
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: setup build-ops demo demo-mae test bench clean

setup: $(VENV)/.installed build-ops

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@

# The optional C++ ops of ema/ and remap/: a failed build says why and the PyTorch fallbacks stay in use.
build-ops: $(VENV)/.installed
	-@$(MAKE) --no-print-directory -C ema PYTHON=$(PY)
	-@$(MAKE) --no-print-directory -C remap PYTHON=$(PY)

# DINO on the embedded data, then k-NN of the trained teacher against a random backbone.
demo: setup
	PYTHON=$(PY) bash training_scripts/demo.sh $(DEMO_DIR)

# MAE pretraining on the embedded data, then fine-tuning from it.
demo-mae: setup
	$(PY) main_pretrain_mae.py --config demo --output_dir $(DEMO_DIR)/mae
	$(PY) main_finetune.py --config demo --finetune $(DEMO_DIR)/mae/checkpoint.pth --output_dir $(DEMO_DIR)/finetune

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/bench_dino.py
	$(PY) bench/bench_eval.py
	$(PY) bench/bench_mae.py
	$(PY) bench/bench_ema.py
	$(PY) bench/bench_augment.py
	$(PY) bench/bench_retrieval.py
	$(PY) bench/bench_propagation.py

clean:
	rm -rf runs .pytest_cache ema/build remap/build
