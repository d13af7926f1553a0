# One home for every check: CI runs `make test` unchanged (.ci/run).
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned in pyproject.toml; on this platform's machines pip takes the CPU wheel
# from the local wheel cache instead of downloading a multi-GB CUDA build.
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install demo test lint format benchmark clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) -e ".[dev]"
	touch $@

# The main job: source stage on the bundled general customer-service data, then the
# few-shot Northwind Market target task; prints the new model version's path last.
demo: install
	$(VENV)/bin/transferdesk train --source sample:customer_service/train.csv

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q --durations=10

benchmark: install
	$(PY) benchmarks/banking77.py

clean:
	rm -rf $(VENV) registry benchmarks/work .pytest_cache .ruff_cache
