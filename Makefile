# chronos-queue: `make run` starts the whole stack, `make test` runs the tests, `make lint` checks the code.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# CPU torch by default; set TORCH_INDEX to a CUDA index (e.g. .../whl/cu128) for GPU workers.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# What `make lint` checks (tests/ and bench/ are not linted).
LINT_PATHS := api workers shared client cli

.PHONY: install lint test run bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ is required (found $(PYTHON))"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# A local CPU wheel when one is configured (find-links; its dependencies then come from PyPI),
	# else PyTorch's CPU index, else PyPI.
	{ $(PIP) install -q --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null \
	    && $(PIP) install -q "torch==$(TORCH_VERSION)"; } \
	  || $(PIP) install -q "torch==$(TORCH_VERSION)" --index-url "$(TORCH_INDEX)" \
	  || $(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[worker,stack,test]"
	touch $@

# ruff (rules and isort) and ruff's formatter, then mypy; configured in pyproject.toml.
lint: install
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	$(PY) -m mypy $(LINT_PATHS)

# The tests start their own redis-server: installed here when missing and running as root (as `make run` does).
test: install
	$(PY) -m cli.stack ensure-redis
	$(PY) -m pytest

run: install
	$(PY) -m cli.stack run

# Every benchmark, one after the other (about 15 minutes on 2 cores); bench/README.md has each command.
bench: install
	$(PIP) install -q -e ".[bench]"
	$(PY) bench/predict_latency.py
	$(PY) bench/throughput.py flood
	$(PY) bench/throughput.py sync
	$(PY) bench/throughput.py bulk
	$(PY) bench/dataplane.py
	$(PY) bench/api_cpu.py
	$(PY) bench/chaos.py
	$(PY) bench/backtest.py
	$(PY) bench/finetune.py

clean:
	rm -rf $(VENV) .cache .run *.egg-info .mypy_cache .ruff_cache
