# Dev commands. Each target sets up .venv itself; see scripts/ for what they run.
PYTHON ?= python3
VENV ?= .venv
REPO ?= model_repository
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: serve test lint typecheck pytest demo bench memory-report soak clean

$(STAMP): pyproject.toml scripts/bootstrap.sh server/native_tokenizer.pyx
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/bootstrap.sh
	touch $(STAMP)

## make serve: install, build the demo repository if absent, start the server on :8000
serve: $(STAMP)
	@test -f $(REPO)/models.yaml || $(BIN)/textserve build-demo --repo $(REPO)
	$(BIN)/textserve serve --repo $(REPO) --host $${TEXTSERVE_HOST:-127.0.0.1} --port $${TEXTSERVE_PORT:-8000}

## make test: install, then ruff, mypy and pytest
test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/textserve build-demo --repo $(REPO)

bench: $(STAMP)
	$(BIN)/textserve bench --out docs/bench

memory-report: $(STAMP)
	$(BIN)/textserve memory-report --repo $(REPO) --out docs/memory

soak: $(STAMP)
	$(BIN)/pytest -m soak -s -p no:cacheprovider tests/test_soak.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
