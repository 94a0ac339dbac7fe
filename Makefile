# `make demo` and `make test` work on a fresh machine with Python 3.10+ and pip: they create (or reuse) a virtual
# environment keyed by the hash of requirements.txt, so an unchanged environment is never reinstalled.
PYTHON ?= python3
REQ_HASH := $(shell sha256sum requirements.txt | cut -c1-12)
VENV ?= $(HOME)/.cache/dinossl/venv-$(REQ_HASH)
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

demo: setup
	$(PY) main_dino.py --config demo --output_dir $(DEMO_DIR)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/bench_dino.py

clean:
	rm -rf runs .pytest_cache
