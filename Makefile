# The commands the README names. Each target sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdir/demo
PYTEST_ARGS ?=

.PHONY: venv demo test lint bench reproduce clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

# Trains the default config (a small NF-ResNet with AGC on the embedded digits).
demo: $(STAMP)
	$(PY) experiment.py --config=configs/default.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -n 2 $(PYTEST_ARGS) tests

lint: $(STAMP)
	$(PY) -m pip install --quiet pyink
	$(VENV)/bin/pyink --check nfnets tests configs benchmarks experiment.py

bench: $(STAMP)
	$(PY) benchmarks/agc_overhead.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/input_pipeline.py

clean:
	rm -rf $(VENV) workdir .pytest_cache

# Regenerates the papers' tables and figures into results/ (latency is
# shrunk here: its full form is meant for an accelerator).
reproduce: $(STAMP)
	for name in table3 spp variance agc depth; do \
	  $(PY) -m nfnets.reproduce $$name || exit 1; done
	$(PY) -m nfnets.reproduce latency --shrink
