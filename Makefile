# Every target sets itself up: a virtual environment in .venv with the package and its dev tools.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test lint format check-config clean tools

$(STAMP): pyproject.toml
	rm -f $(VENV)/.installed-*
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The gateway on 127.0.0.1:8080 in front of two simulated vLLM workers serving `sim-model`.
# Ctrl-C stops all three.
run: $(STAMP)
	@trap 'trap - INT TERM EXIT; kill 0' INT TERM EXIT; \
	$(PY) -m gateway.simulator --host 127.0.0.1 --port 8001 --model sim-model & \
	$(PY) -m gateway.simulator --host 127.0.0.1 --port 8002 --model sim-model & \
	$(PY) -m gateway --config config/local.yaml & \
	wait

# Tools the end-to-end tests drive for real (they fail, never skip, without them).
tools:
	@command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl; }

test: $(STAMP) tools
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway tests
	$(VENV)/bin/ruff format --check gateway tests
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format gateway tests
	$(VENV)/bin/ruff check --fix gateway tests

check-config: $(STAMP)
	$(PY) -m gateway --config config/gateway.yaml --check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
