# The two commands a newcomer needs: `make demo` (the main job end to end) and `make test`.
# Each creates .venv and installs mimcli with its dependencies the first time (~2 min, ~5.6 GB:
# PyPI's torch is a CUDA build that also runs on CPU).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mimcli-installed
FMNIST_IDX ?= /usr/share/datasets/fashion-mnist
DATA ?= data/fmnist
DEMO_OUT ?= runs/demo
MODEL ?= examples/models/fmnist-mae-tiny

.PHONY: venv test test-slow test-ci demo fmnist fmnist-idx lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## Default suite: CPU, no network, no dataset; a few minutes.
test: venv
	$(PY) -m pytest

## Slow suite: needs Fashion-MNIST (Debian package dataset-fashion-mnist).
test-slow: venv fmnist-idx
	$(PY) -m pytest -m slow

## What CI runs: the default suite, then the slow tests (they fit in CI's time).
test-ci: test test-slow

fmnist-idx:
	@if [ ! -f $(FMNIST_IDX)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's dataset-fashion-mnist"; \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	  else \
	    echo "Fashion-MNIST not found in $(FMNIST_IDX): run 'sudo apt-get install dataset-fashion-mnist'"; \
	    exit 2; \
	  fi; \
	fi

fmnist: venv fmnist-idx
	$(PY) examples/export_fashion_mnist.py --idx-dir $(FMNIST_IDX) --out $(DATA)

## The main job on the shipped tiny Fashion-MNIST MAE (for now: probe every block).
demo: fmnist
	$(VENV)/bin/mimcli probe $(MODEL) --train $(DATA)/train --val $(DATA)/test \
	  --k 20 --out $(DEMO_OUT)/probe
	@echo "outputs: $(DEMO_OUT)/probe/probe.json, $(DEMO_OUT)/probe/probe.png"

lint: venv
	$(VENV)/bin/ruff check mimcli tests examples

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
