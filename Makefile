# One-command set-up: every target creates the venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Tests and benchmarks: idle OpenMP threads sleep instead of spinning. With two torch processes on 2 cores (a test
# server, a torchrun pair, a benchmark subprocess) spinning threads make each other ~10x slower. Not for the demo, one
# training process: sleeping threads made its steps up to 1.2x slower (README, demo).
PASSIVE := OMP_WAIT_POLICY=PASSIVE

.PHONY: setup test test-fast demo bench clean

setup: $(STAMP)

# Re-installs only when the pins or the package metadata change. lmms-eval goes in for its adapter tests without its
# dependency tree (seconds, ~40 MB): the tree brings torchvision, whose PyPI build is for CUDA and breaks
# `import transformers` beside the CPU torch (README, "lmms-eval" has the full extra).
$(STAMP): requirements-lock.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements-lock.txt torch==2.13.0
	$(BIN)/pip install -q -c requirements-lock.txt -e '.[dev]'
	$(BIN)/pip install -q -c requirements-lock.txt --no-deps lmms-eval loguru pytz
	touch $(STAMP)

# Two workers (pytest-xdist), one test module each at a time: module-scoped fixtures (the quick demo) run once.
TEST := $(PASSIVE) $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: setup
	$(TEST) tests

# The inner loop: everything but the tests marked slow (see pyproject.toml).
test-fast: setup
	$(TEST) -m "not slow" tests

demo: setup
	$(BIN)/evev2 demo

bench: setup
	$(PASSIVE) $(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
