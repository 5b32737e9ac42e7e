# `make test` and `make demo` work on a fresh clone: they create .venv and install requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA := demo_data/synthetic
DEMO_EXP := experiments

.PHONY: install test demo clean-demo

install: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) run_pipeline.py --recipe demo --data_dir $(DEMO_DATA) --experiments_dir $(DEMO_EXP)

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_EXP)
