# make setup  — create .venv from the pinned requirements and build the extension (idempotent)
# make test   — setup, then the full test suite (a missing extension is an error)
# make bench  — setup, then the throughput studies (quick profile)
# make lint   — ruff (Python) and clang-format (csrc/) checks; part of make test
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip --disable-pip-version-check -q
export MAX_JOBS ?= 2
CXX_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)
NATIVE_SOURCES := setup.py $(CXX_SOURCES)

.PHONY: setup test bench lint clean

setup: $(VENV)/.deps-stamp $(VENV)/.ext-stamp

$(VENV)/.deps-stamp: requirements.txt requirements-extra.txt requirements-lint.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install -r requirements.txt -r requirements-extra.txt -r requirements-lint.txt
	touch $@

$(VENV)/.ext-stamp: $(VENV)/.deps-stamp $(NATIVE_SOURCES)
	$(PIP) install -e . --no-build-isolation --no-deps
	touch $@

lint: $(VENV)/.deps-stamp
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

test: setup lint
	FASTDIFFINST_REQUIRE_EXT=1 $(VPY) -m pytest tests -q --durations=15 $(PYTEST_ARGS)

bench: setup
	$(VPY) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info fastdiffinst/_C*.so $(VENV)/.ext-stamp
