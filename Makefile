# `make demo` and `make test` each create .venv when missing and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned: a plain `torch` would pull a multi-GB CUDA build.
STAMP := $(VENV)/.installed
# .venv is a CPU install; its libtpu (the '.[tpu]' extra) only compiles for TPU slices ahead of time
# (`perco-jax plan --compile`). Without this, jax would try to start a TPU here and log the failure.
export JAX_PLATFORMS ?= cpu

.PHONY: demo test test-slow install clean bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,tpu]'
	# the LPIPS reference; --no-deps: its torchvision requirement would not load with the CPU torch
	$(PY) -m pip install --quiet --no-deps lpips==0.1.4
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/perco-jax demo --workdir demo

# `make test`: everything but the tests marked slow (each ~15 s or more), which `make test-slow`
# runs; CI (.ci/run) runs both. Two pytest processes (pytest-xdist): XLA compiles on one core, and
# much of the suite is compilation. The tests of each shared trained codec are one xdist group, so
# one process trains it (tests/conftest.py).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow" tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m slow tests

bench: $(STAMP)
	$(PY) benchmarks/mmdit.py

clean:
	rm -rf $(VENV) runs
