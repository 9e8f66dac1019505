# `make demo` and `make test` do all set-up themselves: a .venv made with python3 -m venv and the
# pinned ranges of requirements-dev.txt, reinstalled only when a requirements file changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REQ_FILES := requirements.txt requirements-dev.txt $(wildcard */requirements.txt)
REQ_HASH := $(shell cat $(REQ_FILES) | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)
# Each folder's tests run in their own pytest process, so same-named modules never collide; TEST_JOBS
# of them at a time (longest first), each writing .test-logs/<folder>.log.
TEST_DIRS := $(foreach d,ldm ddpm controlnet evaluation dit core demo app,$(if $(wildcard $(d)/tests),$(d)))
TEST_JOBS ?= 2
BENCH_DIRS := $(foreach d,ddpm evaluation ldm dit,$(if $(wildcard $(d)/bench.py),$(d)))
# The shared core: core/ is the canonical copy, each of these folders holds an identical one.
CORE_DIRS := ddpm ldm controlnet dit evaluation
export HF_HUB_OFFLINE := 1

.PHONY: setup demo app browser test lint bench clean vendor check-vendor docs

setup: $(STAMP)

$(STAMP): $(REQ_FILES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(PY) demo/run_demo.py $(DEMO_ARGS)

# The web app on the demo's checkpoints (trained first by `make demo` when they are missing); options of
# app/serve.py go through APP_ARGS, e.g. make app APP_ARGS="--port 8080".
APP_CHECKPOINTS := demo_output/models
app: $(STAMP)
	@test -f $(APP_CHECKPOINTS)/digits/ema_ckpt.pt || $(PY) demo/run_demo.py $(DEMO_ARGS)
	$(PY) app/serve.py --checkpoints $(APP_CHECKPOINTS) $(APP_ARGS)

# app/'s browser test drives Debian's headless Chromium through chromedriver: installed here when missing
# (as root, or with sudo that needs no password). If that fails the browser test fails and says why.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		echo "installing Debian's chromium and chromium-driver for app/tests/test_browser.py"; \
		sudo=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
		{ $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq \
			chromium chromium-driver; } > /dev/null 2>&1 || echo "warning: could not install chromium"; \
	fi

vendor:
	@for d in $(CORE_DIRS); do rm -rf $$d/core && mkdir -p $$d/core && cp core/*.py $$d/core/; done
	@echo "core/ copied into $(CORE_DIRS)"

check-vendor:
	@for d in $(CORE_DIRS); do \
		diff -rq -x __pycache__ -x tests core $$d/core || { echo "error: $$d/core differs from core/: edit core/ and run make vendor"; exit 1; }; \
	done

# The flag tables of the folders' READMEs, regenerated from the scripts' parsers (core/flagdocs.py).
docs: $(STAMP)
	@for d in $(CORE_DIRS); do (cd $$d && ../$(PY) -m core.flagdocs README.md README_zh.md) || exit 1; done

test: $(STAMP) check-vendor $(if $(filter app,$(TEST_DIRS)),browser)
	@rm -rf .test-logs && mkdir -p .test-logs
	@printf '%s\n' $(TEST_DIRS) | xargs -P $(TEST_JOBS) -I{} sh -c \
		'start=$$(date +%s); (cd {} && ../$(PY) -m pytest tests) > .test-logs/{}.log 2>&1; \
		rc=$$?; echo "== tests: {} $$(grep -E "[0-9]+ (passed|failed|error)" .test-logs/{}.log | tail -n 1 | tr -d =) ($$(( $$(date +%s) - start )) s)"; \
		[ $$rc -eq 0 ] || touch .test-logs/{}.failed'
	@failed=""; for d in $(TEST_DIRS); do \
		if [ -e .test-logs/$$d.failed ]; then failed="$$failed $$d"; echo "== failures: $$d"; tail -n 60 .test-logs/$$d.log; fi; \
	done; \
	echo "== lint"; $(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . || failed="$$failed lint"; \
	if [ -n "$$failed" ]; then echo "FAILED:$$failed"; exit 1; fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	@for d in $(BENCH_DIRS); do echo "== bench: $$d"; (cd $$d && ../$(PY) bench.py) || exit 1; done
	@echo "== bench: trainers against the code before the shared core"; $(PY) bench/trainers.py

clean:
	rm -rf demo_output .pytest_cache .ruff_cache .test-logs
