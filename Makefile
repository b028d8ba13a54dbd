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

.PHONY: venv test test-slow test-ci demo bench fmnist fmnist-idx fmnist-try lint clean

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

# Install Debian's Fashion-MNIST where possible (root + apt); never fails: without it the demo
# uses the 5,000/1,000-image subset shipped in examples/data and says so.
fmnist-try:
	@if [ ! -f $(FMNIST_IDX)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null \
	    && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
	    || echo "could not install dataset-fashion-mnist: the demo uses the shipped subset"; \
	fi

## The main job end to end on the shipped tiny Fashion-MNIST MAE:
## probe -> refine -> eval -> push --dry-run, then the before/after table (runs/demo/summary.md).
demo: venv fmnist-try
	$(PY) examples/demo.py --model $(MODEL) --out $(DEMO_OUT) --data $(DATA) \
	  --idx-dir $(FMNIST_IDX)

## Speed and memory benchmarks (ratios measured in one run; see BENCHMARKS.md). ~30 min on 2 cores.
bench: venv
	$(PY) -m benchmarks

lint: venv
	$(VENV)/bin/ruff check mimcli tests examples benchmarks

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
