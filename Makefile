# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TEST_DATA ?= $(abspath ../shared/testdata)
DEMO_DIR ?= dscovid_demo

.PHONY: install dicom3tools demo test test-slow test-all lint clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# dciodvfy (Debian package dicom3tools) validates the DICOM-SEG and SR the tests write; without it (no root, no apt)
# those checks are skipped, and say so.
dicom3tools:
	@command -v dciodvfy >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y -q dicom3tools >/dev/null 2>&1 || \
		  { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dicom3tools >/dev/null 2>&1; }; }; } || \
		echo "make: dicom3tools could not be installed (needs root and apt-get): the dciodvfy checks will be skipped"

demo: install
	$(VENV)/bin/dscovid_demo -o $(DEMO_DIR)

test: install dicom3tools
	DSCOVID_TEST_DATA=$${DSCOVID_TEST_DATA:-$(TEST_DATA)} $(PY) -m pytest -q
	$(VENV)/bin/ruff check dscovid dataset_conversion tests benchmarks

# The slow end-to-end tests alone (the 300-case findings, kill -9 and resume, torchrun, full DICOM series).
test-slow: install dicom3tools
	DSCOVID_TEST_DATA=$${DSCOVID_TEST_DATA:-$(TEST_DATA)} $(PY) -m pytest -q -m slow

test-all: install dicom3tools
	DSCOVID_TEST_DATA=$${DSCOVID_TEST_DATA:-$(TEST_DATA)} $(PY) -m pytest -q -m ""

lint: install
	$(VENV)/bin/ruff check dscovid dataset_conversion tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info
