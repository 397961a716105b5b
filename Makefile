# Two entry points: `make demo` and `make test`. Both create .venv and install everything they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: install data demo test lint bench docs clean

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

# The documentation site (docs/, mkdocs.yml) into build/site; any warning fails the build.
# The docs extra is installed by itself: mkdocs-material needs a newer requests than torchattacks
# 3.5.1 declares (torchattacks never imports it), so pip cannot resolve '.[dev,docs]' at once.
docs: install $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site

$(VENV)/.docs-installed: pyproject.toml
	$(BIN)/pip install --quiet -e '.[docs]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
