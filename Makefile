# Two entry points: `make demo` and `make test`. Both create .venv and install everything they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: install data demo test lint typecheck bench docs clean

install: $(STAMP)

# The ranges of pyproject.toml, at the exact versions of constraints.txt. torchattacks goes in by
# itself, without its declared dependencies (see pyproject.toml's dev extra).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,docs,plots,timm,tensorboard]'
	$(BIN)/pip install --quiet --no-deps -c constraints.txt torchattacks==3.5.1
	touch $(STAMP)

# Fashion-MNIST ships as a Debian package; install it when it is missing.
data:
	@if [ ! -e $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: install data
	$(BIN)/featdenoise demo

# The whole suite (with the layout rules: sizes, ruff, the import-linter layer contracts), the
# numerics tests again under another CPU's kernels, the type check, the docs built strictly.
test: install data
	$(BIN)/python -m pytest -q
	PY=$(BIN)/python scripts/test_other_kernels.sh
	$(MAKE) --no-print-directory typecheck docs

lint: install
	$(BIN)/ruff check src tests scripts
	$(BIN)/lint-imports --no-cache
	$(MAKE) --no-print-directory typecheck

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/featdenoise bench ops
	$(BIN)/featdenoise bench attacks
	$(BIN)/featdenoise bench train

# The documentation site (docs/, mkdocs.yml) into build/site; any warning fails the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
