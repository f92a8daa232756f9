# Everything installs into .venv with pip (the torch pair is pinned; see pyproject.toml).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint test-kernels-down test-slow fuzz clean

$(BIN)/fl-sparse: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,flower,study]'  # flower: tests/test_flower.py; study: Ray Tune
	$(BIN)/pip check
	touch $(BIN)/fl-sparse

install: $(BIN)/fl-sparse

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/fl-sparse run pffdst demo --rounds 40 --bind 'TwoStage.readjust_every=5'

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

# The package's layers and import rules (pyproject.toml [tool.importlinter], docs/design.md "Layers") and ruff.
lint: install
	$(BIN)/lint-imports
	$(BIN)/ruff check fl_sparse tests tools benchmarks

# The kernels-marked tests again, with the CPU kernels forced one ISA level below the host's (see the script).
test-kernels-down: install
	HF_HUB_OFFLINE=1 $(BIN)/python tools/kernels_down.py

test-slow: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) mlflow.db mlruns .pytest_cache .hypothesis

fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q tests/properties/test_codec_fuzz.py tests/properties/test_codec_bounds.py
