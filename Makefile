# Two entry points that work on a fresh machine: `make demo` and `make test`.
# TORCH is overridable, e.g. `make test TORCH="torch==2.6.0"`; pinning it keeps pip from
# pulling a multi-GB CUDA build on machines that only need the CPU wheel.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the project metadata changes, so a second run starts in seconds.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,viz]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/attnkit walkthrough --out out/walkthrough

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_attention.py --quick

clean:
	rm -rf $(VENV) out build *.egg-info src/*.egg-info
