# Two entry points: `make demo` and `make test`. Both create .venv and install everything they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: install data demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST ships as a Debian package; install it when it is missing.
data:
	@if [ ! -e $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: install data
	$(BIN)/featdenoise demo

# The whole suite, then the numerics tests again under another CPU's kernels.
test: install data
	$(BIN)/python -m pytest -q
	PY=$(BIN)/python scripts/test_other_kernels.sh

lint: install
	$(BIN)/ruff check src tests

bench: install
	$(BIN)/featdenoise bench ops
	$(BIN)/featdenoise bench attacks
	$(BIN)/featdenoise bench train

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
