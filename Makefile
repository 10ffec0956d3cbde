# Two entry points on a fresh machine:  `make demo`  and  `make test`.
# Each creates its own virtualenv (.venv) from this project's files.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-backbones bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,demo]"
	touch $@

demo: $(VENV)/.installed
	$(PY) cli.py demo

test: $(VENV)/.installed
	bash tests/setup_browser.sh
	$(PY) -m pytest -q -n auto --dist loadfile

# Every registered backbone through ONNX Runtime, against Keras's own application and its ImageNet file, and the
# slowest per-family checks the default suite leaves out (about 15 minutes).
test-backbones: $(VENV)/.installed
	$(PY) -m pytest -q tests/test_backbones.py tests/test_runtime.py tests/test_fold.py --every-backbone -m every_backbone

bench: $(VENV)/.installed
	$(PY) bench/extract.py
	$(PY) bench/runtime_ab.py
	$(PY) bench/heads.py
	$(PY) bench/backbones.py

clean:
	rm -rf $(VENV) cache/*.h5 reports/*.html runs
