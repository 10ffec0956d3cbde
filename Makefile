# Two entry points on a fresh machine:  `make demo`  and  `make test`.
# Each creates its own virtualenv (.venv) from this project's files.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,demo]"
	touch $@

demo: $(VENV)/.installed
	$(PY) cli.py demo

test: $(VENV)/.installed
	bash tests/setup_browser.sh
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) bench/extract.py
	$(PY) bench/heads.py

clean:
	rm -rf $(VENV) cache/*.h5 reports/*.html runs
