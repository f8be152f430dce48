# The README's two commands: `make demo` (set up + main job on the embedded default) and
# `make test` (set up + test suite). Both install the pinned requirements first. `make compare`: every
# editor on tiny-blip2 and the three synthetic datasets, tables under records/compare/, README Results;
# the datasets run in JOBS processes at once (one thread each on two cores; `make compare JOBS=1`: one by one).
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
JOBS ?= 3

.PHONY: setup test demo compare
setup:
	$(PIP) install -q -r requirements.txt

test: setup
	$(PYTHON) -m pytest

demo: setup
	$(PYTHON) -m scripts.demo

compare: setup
	$(PYTHON) -m scripts.compare -mn tiny-blip2 -dn SYNTH-EVQA,SYNTH-EIC,SYNTH-VLKEB --editors all \
		--eval_at 1,10,100,1000 --seeds 0 --jobs $(JOBS) --update_readme
