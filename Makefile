# Everything a fresh clone needs: `make demo`, `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo lint test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	@if ! command -v strace >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && apt-get install -y -qq strace) >/dev/null 2>&1 || echo "note: could not install strace; fault-injection tests will be skipped"; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tensorkeep.demo

# The habits that keep the layers one-way (ARCHITECTURE.md): style, types, and the import-linter contract.
lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

# -n auto: one pytest worker per core (pytest-xdist); on this 2-core machine the suite takes ~10 min
# instead of ~15 serially.
test: lint
	$(BIN)/python -m pytest tests -n auto

# The same tests with the long campaign sizes (pytest --long: 10x the kills, power cuts, fuzz inputs;
# the option table is in tests/conftest.py); those campaigns run about ten times as long as in `make test`.
.PHONY: test-long
test-long: $(STAMP)
	$(BIN)/python -m pytest tests -n auto --long

bench: $(STAMP)
	$(BIN)/python bench/bench_files.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .hypothesis
