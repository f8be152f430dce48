# The README's two commands: `make demo` (set up + main job on the embedded default) and
# `make test` (set up + test suite). Both install the pinned requirements first.
PYTHON ?= python
PIP ?= $(PYTHON) -m pip

.PHONY: setup test demo
setup:
	$(PIP) install -q -r requirements.txt

test: setup
	$(PYTHON) -m pytest

demo: setup
	$(PYTHON) -m scripts.demo
