# make run: set up and start the server on the embedded defaults.
# make test: set up and pass the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test bench clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

run: setup
	$(PY) bin/devastator

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info
