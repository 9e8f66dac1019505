# `make demo` and `make test` do all set-up themselves: a .venv made with python3 -m venv and the
# pinned ranges of requirements-dev.txt, reinstalled only when a requirements file changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REQ_FILES := requirements.txt requirements-dev.txt $(wildcard */requirements.txt)
REQ_HASH := $(shell cat $(REQ_FILES) | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)
# Each folder's tests run in their own pytest process, so same-named modules never collide.
TEST_DIRS := $(foreach d,core ddpm evaluation ldm controlnet dit demo,$(if $(wildcard $(d)/tests),$(d)))
BENCH_DIRS := $(foreach d,ddpm evaluation ldm dit,$(if $(wildcard $(d)/bench.py),$(d)))
# The shared core: core/ is the canonical copy, each of these folders holds an identical one.
CORE_DIRS := ddpm ldm controlnet dit evaluation
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test lint bench clean vendor check-vendor

setup: $(STAMP)

$(STAMP): $(REQ_FILES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(PY) demo/run_demo.py $(DEMO_ARGS)

vendor:
	@for d in $(CORE_DIRS); do rm -rf $$d/core && mkdir -p $$d/core && cp core/*.py $$d/core/; done
	@echo "core/ copied into $(CORE_DIRS)"

check-vendor:
	@for d in $(CORE_DIRS); do \
		diff -rq -x __pycache__ -x tests core $$d/core || { echo "error: $$d/core differs from core/: edit core/ and run make vendor"; exit 1; }; \
	done

test: $(STAMP) check-vendor
	@failed=""; for d in $(TEST_DIRS); do \
		echo "== tests: $$d"; \
		(cd $$d && ../$(PY) -m pytest tests) || failed="$$failed $$d"; \
	done; \
	echo "== lint"; $(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . || failed="$$failed lint"; \
	if [ -n "$$failed" ]; then echo "FAILED:$$failed"; exit 1; fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	@for d in $(BENCH_DIRS); do echo "== bench: $$d"; (cd $$d && ../$(PY) bench.py) || exit 1; done

clean:
	rm -rf demo_output .pytest_cache .ruff_cache
