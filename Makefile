# navit — the two user commands are `make demo` and `make test`; both set everything up from scratch.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.navit-installed
DEMO_DIR ?= $(shell mktemp -d -t navit-demo-XXXXXX 2>/dev/null || echo /tmp/navit-demo)

.PHONY: help setup demo test lint format bench clean clean-venv

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  variables: TORCH='$(TORCH)' (e.g. make TORCH='torch==2.14.1' setup), PYTHON=$(PYTHON)"

setup: $(STAMP)  ## create .venv and install navit with its dependencies

$(STAMP): pyproject.toml Makefile scripts/system_deps.sh
	@scripts/system_deps.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24" setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@# timm (tests/test_timm_convert.py's reference) without its dependencies: its torchvision pin
	@# would replace the chosen torch, and a ViT's forward needs none of them (tests/timm_runner.py).
	$(BIN)/python -m pip install -q --no-deps "timm>=1.0,<2"
	@# matplotlib pulls plain pillow, which overwrites PIL: put pillow-simd back, last.
	$(BIN)/python -m pip uninstall -q -y pillow >/dev/null 2>&1 || true
	$(BIN)/python -m pip install -q --force-reinstall --no-deps pillow-simd
	@$(BIN)/python -c "import PIL, sys; v = PIL.__version__; print('PIL', v, '(pillow-simd)' if '.post' in v else ''); sys.exit(0 if '.post' in v else 'PIL is not the pillow-simd build: ' + v)"
	@touch $(STAMP)

demo: $(STAMP)  ## set up, then run the main job end to end on a synthetic dataset
	@bash scripts/demo.sh "$(DEMO_DIR)"

test: $(STAMP)  ## set up, lint, then run the test suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)  ## ruff lint + format check only
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)  ## apply ruff formatting and autofixes
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

bench: $(STAMP)  ## list the benchmark scripts (run by hand; results go in the README)
	@ls benchmarks/*.py

clean:  ## remove caches and build leftovers
	rm -rf .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -not -path './$(VENV)/*' -exec rm -rf {} +

clean-venv:  ## remove the virtual environment
	rm -rf $(VENV)
