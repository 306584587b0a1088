# extproc: every target sets up .venv itself when it is missing.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-slow fuzz lint bench protos clean conformance

help: ## Show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

# Redis is Debian's real server: the shared-limit tests start their own on a free loopback port.
REDIS_SERVER := $(shell command -v redis-server 2>/dev/null)
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo -n)

# tests/manifests/upstream: npm packages that ship the upstream CRD schemas the manifest tests
# validate against (test-only, nothing there runs; docs/dependencies.md).
$(STAMP): pyproject.toml tests/manifests/upstream/package-lock.json
	@test -n "$(REDIS_SERVER)" || $(SUDO) apt-get install -y -q redis-server \
	  || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q redis-server)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	npm ci --no-audit --no-fund --ignore-scripts --loglevel=error --prefix tests/manifests/upstream
	@touch $(STAMP)

setup: $(STAMP) ## Create .venv and install extproc with its dev tools

demo: $(STAMP) ## Run the demo: simulated fleet, real Envoy, the picker, a short workload, a report
	$(BIN)/extproc demo

test: $(STAMP) ## Run the test suite (unit, gRPC integration, real Envoy end to end)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

# Benchmarks run end to end in their quick forms (chaos, soak, streamed overhead): minutes.
test-slow: $(STAMP) ## Run the slow tests too: the benchmarks end to end (CI runs them)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow

# vLLM's own code, read from its wheel on PyPI (no install, no torch): tests/conformance checks our
# block hashes, KV events, metric names and NIXL params against it. docs/conformance.md.
VLLM_VERSION ?= 0.33.0
VLLM_WHEEL   := .cache/vllm-wheel/$(VLLM_VERSION)
$(VLLM_WHEEL)/.unpacked:
	@mkdir -p $(VLLM_WHEEL)
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --dest $(VLLM_WHEEL) vllm==$(VLLM_VERSION)
	$(BIN)/python -c "import glob, sys, zipfile; z = zipfile.ZipFile(glob.glob(sys.argv[1] + '/vllm-*.whl')[0]); z.extractall(sys.argv[1] + '/src', [n for n in z.namelist() if n.endswith('.py')])" $(VLLM_WHEEL)
	rm -f $(VLLM_WHEEL)/vllm-*.whl
	@touch $@

conformance: $(STAMP) $(VLLM_WHEEL)/.unpacked ## Check hashes, KV events, metrics against vLLM's own code (its wheel)
	EXTPROC_VLLM_SRC=$(VLLM_WHEEL)/src $(BIN)/python -m pytest -q -p no:cacheprovider tests/conformance

# `make test` runs the same properties bounded (150 examples each, the same every run).
fuzz: $(STAMP) ## Fuzz the parser and the decision path: thousands of random examples per property
	EXTPROC_FUZZ=1 $(BIN)/python -m pytest -q -p no:cacheprovider --timeout=3600 tests/fuzz

lint: $(STAMP) ## ruff, mypy (strict) and the import layers
	$(BIN)/ruff check extproc tests benchmarks
	$(BIN)/ruff format --check extproc tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP) ## Run the benchmarks (see docs/benchmarks.md)
	$(BIN)/extproc bench overhead

# A proto's path under protos/ is the package its code lands in (protos/extproc/_generated/x.proto
# -> extproc._generated.x_pb2), so generated imports are absolute and work from anywhere.
protos: $(STAMP) ## Regenerate extproc/_generated from protos/ with grpcio-tools
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. \
	  $$(find protos -name '*.proto')

clean: ## Remove .venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
