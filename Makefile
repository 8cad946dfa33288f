# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use (pip; torch/torchvision come from the local disk where available).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.cache/prefect

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	mkdir -p $(PREFECT_HOME)
	$(VENV)/bin/agentic-pruner demo

test: $(STAMP)
	mkdir -p $(PREFECT_HOME)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/mac_targeting.py

clean:
	rm -rf $(VENV) .cache runs
