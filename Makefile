# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TEST_DATA ?= $(abspath ../shared/testdata)
DEMO_DIR ?= dscovid_demo

.PHONY: install demo test test-slow test-all lint clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/dscovid_demo -o $(DEMO_DIR)

test: install
	DSCOVID_TEST_DATA=$${DSCOVID_TEST_DATA:-$(TEST_DATA)} $(PY) -m pytest -q
	$(VENV)/bin/ruff check dscovid dataset_conversion tests benchmarks

# The slow end-to-end tests alone (the 300-case findings, kill -9 and resume, torchrun, full DICOM series).
test-slow: install
	DSCOVID_TEST_DATA=$${DSCOVID_TEST_DATA:-$(TEST_DATA)} $(PY) -m pytest -q -m slow

test-all: install
	DSCOVID_TEST_DATA=$${DSCOVID_TEST_DATA:-$(TEST_DATA)} $(PY) -m pytest -q -m ""

lint: install
	$(VENV)/bin/ruff check dscovid dataset_conversion tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info
