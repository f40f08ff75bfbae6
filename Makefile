# make run: set up and start the server on the embedded defaults.
# make test: set up and pass the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JS := clients/js
JS_STAMP := $(JS)/node_modules/.installed

.PHONY: setup run test test-python test-js bench clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

run: setup
	$(PY) bin/devastator

$(JS_STAMP): $(JS)/package.json $(JS)/package-lock.json
	cd $(JS) && npm ci --no-audit --no-fund --loglevel=error
	touch $(JS_STAMP)

# The Python suite, then the JS client's (node --test: state machine, real server, headless Chromium).
test: test-python test-js

test-python: setup
	$(PY) -m pytest -q tests

test-js: setup $(JS_STAMP)
	cd $(JS) && npm test

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info $(JS)/node_modules $(JS)/test-artifacts
