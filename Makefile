# One venv in .venv; every target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned, so no later install pulls another build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install test test-full lint demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)  ## the default suite (no slow tests); exit code 5 (nothing collected) fails
	$(PY) -m pytest -m "not slow" -q

test-full: $(STAMP)  ## everything, slow tests included
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check sapp_lightning tests
	$(PY) -m ruff format --check sapp_lightning tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
