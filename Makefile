# Two commands do all set-up on a fresh machine:
#   make reproduce   # quick profile of every figure -> results/
#   make test        # the test suite
# Both create (or reuse) the virtual environment in $(VENV) and install what they need.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: the local CPU build of torch. An unpinned `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PROFILE ?= quick
OUT ?= results
DEVICE ?= cpu

.PHONY: venv data reproduce test lint format bench bench-extras clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,plot]"
	@touch $@

venv: $(VENV)/.installed

# FashionMNIST: present, or installed from Debian's package where the machine allows (root),
# or downloaded by torchvision where installed and online; otherwise one line says how.
data: venv
	$(PY) -m sgdnoise.data.fetch --required

reproduce: venv data
	$(VENV)/bin/sgdnoise reproduce --profile $(PROFILE) --device $(DEVICE) --out $(OUT)

test: venv
	$(PY) -m sgdnoise.data.fetch || true
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

bench: venv
	$(PY) bench/run_all.py --out bench/out

# PyHessian, the baseline of bench/bench_scale.py (bench only; --no-deps: it would pull its own torch)
bench-extras: venv
	$(VENV)/bin/pip install --no-deps pyhessian

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
