# Two commands do everything: `make demo` and `make test`. Both create .venv when missing and
# install the exact versions of requirements.lock (hashes checked), so one commit installs the same
# environment next month. `make test-latest` tries the newest versions pyproject.toml allows;
# `make lock` refreshes the lock (README: "Refreshing the lock").
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LATEST := .venv-latest
LOCK := requirements.lock
DEMO_OUT ?= demo-out
PIP_QUIET := -q --disable-pip-version-check
# torch first: the pinned CPU build lies on this machine's disk; a plain "torch" pulls GBs.
TORCH := torch==2.13.0
# Where pip finds that local torch build (pip's own configuration), for uv when it locks.
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)

.PHONY: demo test test-fast test-latest lock install clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) --upgrade pip
	$(PY) -m pip install $(PIP_QUIET) --no-deps $(TORCH)
	# Every package at its locked version and hash; the lock is complete, so no resolution.
	$(PY) -m pip install $(PIP_QUIET) --require-hashes --no-deps -r $(LOCK)
	# No build isolation: the lock's setuptools builds it, so nothing unpinned is fetched.
	$(PY) -m pip install $(PIP_QUIET) --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/galaxy-llava demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The suite on the newest versions pyproject.toml's ranges allow, in a venv of its own: run it
# before refreshing the lock.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install $(PIP_QUIET) --upgrade pip
	$(LATEST)/bin/python -m pip install $(PIP_QUIET) $(TORCH)
	$(LATEST)/bin/python -m pip install $(PIP_QUIET) --upgrade --upgrade-strategy eager -e '.[test]'
	$(LATEST)/bin/python -m pip list --format=freeze | grep -iE '^(transformers|peft|accelerate|datasets|gradio)=='
	$(LATEST)/bin/python -m pytest -q

# Refresh the lock to the newest versions inside pyproject.toml's ranges (uv resolves; pip installs).
lock:
	test -x .venv-lock/bin/uv || ($(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install $(PIP_QUIET) uv)
	.venv-lock/bin/uv pip compile pyproject.toml --extra test --generate-hashes --upgrade \
	  $(addprefix --find-links ,$(FIND_LINKS)) --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --custom-compile-command "make lock" -o $(LOCK)

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
