# Two entry points that work on a fresh machine: `make demo` and `make test`.
# TORCH is overridable, e.g. `make test TORCH="torch==2.6.0"`; pinning it keeps pip from
# pulling a multi-GB CUDA build on machines that only need the CPU wheel.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test smoke bench clean browser docs docs-samples

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the project metadata changes, so a second run starts in seconds.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,viz,hf,notebook,docs]" "$(TORCH)"
	touch $(STAMP)

# attnkit's C++ kernels (src/attnkit/backends/: _attn_kernel*.cpp behind the chunked backend,
# _decode_kernel.cpp behind decode), compiled by backends/_ext.py for this CPU's instruction set
# (the avx512, avx2 or SSE2 target: explicit flags, never -march=native) into
# src/attnkit/backends/_build/, then this machine's rates for the cost rules measured (~1 s;
# backends/_rates.py). Never fails the build: without a compiler it says why and the backends
# run their PyTorch implementations. (pip users get the same builds on first use, into
# ~/.cache/attnkit.)
KERNELS := $(VENV)/.kernels
KERNEL_SOURCES := $(wildcard src/attnkit/backends/_*kernel*.cpp src/attnkit/backends/_attn_*.h)
$(KERNELS): $(STAMP) $(KERNEL_SOURCES) src/attnkit/backends/_ext.py src/attnkit/backends/_rates.py
	-$(BIN)/python -c "from attnkit.backends._ext import main; main()"
	-$(BIN)/python -c "from attnkit.backends._rates import main; main()"
	touch $(KERNELS)

# The main job: the tutorial step by step, then the date translator (trained on first run,
# a few minutes on 2 cores; later runs reuse out/translate/), then a few translations.
# Every answer is checked before it is printed: the last line shows a refusal (exit 2).
demo: $(STAMP) $(KERNELS)
	$(BIN)/attnkit walkthrough --out out/walkthrough
	$(BIN)/attnkit translate train --if-missing --threads 1
	$(BIN)/attnkit translate "thursday june 25 2009"
	$(BIN)/attnkit translate "25th of June, 2009" --plot out/translate/june25.png
	$(BIN)/attnkit translate "06/25/09" "2009-06-25" "25/06/2009"
	-$(BIN)/attnkit translate "february 30, 2020"

# The explorer's browser tests drive Debian's chromium; install it (and its driver) when it is
# missing and apt-get can run (root, or sudo without a password). Never fails the build: without
# a browser those tests skip and say why.
browser:
	@if [ -n "$(SKIP_BROWSER)" ]; then echo "make browser: skipped (SKIP_BROWSER is set)"; \
	elif command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "make browser: no apt-get; the browser tests will skip (install chromium and chromedriver)"; \
	else \
		if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
		else echo "make browser: not root and no sudo; the browser tests will skip"; exit 0; fi; \
		($$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install \
			-y -qq chromium chromium-driver >/dev/null) \
		|| echo "make browser: apt-get could not install chromium; the browser tests will skip"; \
	fi

# The whole test suite except the benchmark smoke runs (see smoke), README.md's and docs/*.md's
# Python blocks included, on every core (pytest-xdist: JOBS=auto, or JOBS=0 for one process).
# --dist loadfile sends each file to one worker: a page's blocks share one namespace and run in
# order, and a module's fixtures (trained tiny models, a compiled graph) are built once.
# `make test SKIP_BROWSER=1` neither installs chromium nor runs the browser tests;
# PYTEST_ARGS passes more options.
SKIP_BROWSER ?=
PYTEST_ARGS ?=
JOBS ?= auto
test: $(STAMP) $(KERNELS) browser
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadfile $(if $(SKIP_BROWSER),-k "not browser") $(PYTEST_ARGS)

# Each benchmark's --quick mode, and the JSON it writes, on every core like the suite (no
# timing is asserted: the quick tables are for reading; real figures come from one benchmark
# at a time on a quiet machine).
smoke: $(STAMP) $(KERNELS)
	$(BIN)/python -m pytest -q -n $(JOBS) -m bench

# The documentation site with its API reference from the docstrings, into site/ (mkdocs.yml);
# warnings are errors, as in the suite (tests/test_docs_site.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

# Rewrite the printed samples (```text after a ```python block) of README.md and docs/*.md with
# what the blocks print now (tools/regen_docs.py; the suite compares them).
docs-samples: $(STAMP)
	$(BIN)/python tools/regen_docs.py

bench: $(STAMP) $(KERNELS)
	$(BIN)/python benchmarks/bench_attention.py --quick

clean:
	rm -rf $(VENV) out build site *.egg-info src/*.egg-info src/attnkit/backends/_build
