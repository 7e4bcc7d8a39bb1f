# make setup  — create .venv from the pinned requirements and build the extension (idempotent)
# make test   — setup, then the full test suite (a missing extension is an error)
# make bench  — setup, then the throughput studies (quick profile)
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip --disable-pip-version-check -q
export MAX_JOBS ?= 2
NATIVE_SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)

.PHONY: setup test bench clean

setup: $(VENV)/.deps-stamp $(VENV)/.ext-stamp

$(VENV)/.deps-stamp: requirements.txt requirements-extra.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install -r requirements.txt -r requirements-extra.txt
	touch $@

$(VENV)/.ext-stamp: $(VENV)/.deps-stamp $(NATIVE_SOURCES)
	$(PIP) install -e . --no-build-isolation --no-deps
	touch $@

test: setup
	FASTDIFFINST_REQUIRE_EXT=1 $(VPY) -m pytest tests -q --durations=15 $(PYTEST_ARGS)

bench: setup
	$(VPY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info fastdiffinst/_C*.so $(VENV)/.ext-stamp
