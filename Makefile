# Two commands on a fresh clone: `make report` (the default gap report) and `make test` (the whole suite).
# Both create .venv if missing and install everything through constraints.txt; both are idempotent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kd-workbench-installed
# workbench.data.animals reads this wheel's files; its metadata requires tensorflow, which it does not need
ANIMALS := animal-mnist==0.4
ANIMALS_STAMP := $(VENV)/.kd-workbench-$(ANIMALS)

.PHONY: install report test benchmark screenshot

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel
	$(PY) -m pip install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# after the main install (and again whenever it reruns); --no-deps keeps tensorflow out
$(ANIMALS_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps $(ANIMALS)
	touch $(ANIMALS_STAMP)

install: $(STAMP) $(ANIMALS_STAMP)

report: install
	$(VENV)/bin/kd-workbench report gap

test: install
	$(PY) -m pytest

benchmark: install
	$(PY) benchmarks/cka_matrix.py --markdown reports/results/cka_benchmark.md

# docs/gap_report.png, the README's picture: render the default gap report, then screenshot its top
# (down to the interactive CKA heatmap) in headless /usr/bin/chromium, offline
screenshot: install
	$(VENV)/bin/kd-workbench report gap
	$(PY) tools/screenshot_report.py --output docs/gap_report.png
