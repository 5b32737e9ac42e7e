# `make test` and `make demo` work on a fresh clone: they create .venv and install requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Everything the demo writes lives under demo_data/ (the recipe's data_dir and experiments_dir), never in
# experiments/, the default folder of real runs.
DEMO_ROOT := demo_data
DEMO_OUTPUTS := $(DEMO_ROOT)/synthetic $(DEMO_ROOT)/experiments

.PHONY: install test bench demo clean-demo

install: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# Throughput and peak memory of every stage: tiny configs on the CPU, paper configs on a GPU if there is
# one; writes experiments/bench/bench.json and bench.md.
bench: $(STAMP)
	$(PY) -m tools.bench --all

demo: $(STAMP)
	$(PY) run_pipeline.py --recipe demo

clean-demo:
	rm -rf $(DEMO_OUTPUTS)
	rmdir $(DEMO_ROOT) 2>/dev/null || true
