# `make demo` and `make test` set up .venv on first use (idempotent), then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.reason-installed

.PHONY: setup demo test test-fast bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,dev,ray,serve]"
	# PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch and break transformers imports.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/reason demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"
