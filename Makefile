# The quick-start commands: `make demo` and `make test` (`make test-slow` for the long and
# memory-hungry tests; CI runs both). All of them install first.
PYTHON ?= python3
# A pinned CPU build: an open torch range can pull a multi-GB CUDA build on Linux.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-slow lint bench

install:
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	fxalign demo

# Test workers (pytest-xdist): one per core of the 2-core CI machine, each under 1 GB.
WORKERS ?= 2

# Under 5 minutes and 4 GB on the 2-core CI machine.
test: install
	$(PYTHON) -m pytest -m "not slow" -n $(WORKERS)

# The slow group: the >2 GB model, the benchmark smoke run, the largest transformer exports.
test-slow: install
	$(PYTHON) -m pytest -m slow -n $(WORKERS)

lint: install
	ruff check fxalign tests benchmarks
	ruff format --check fxalign tests benchmarks
	mypy

# Full benchmark (about 20 minutes on the 2-core CI machine); rewrites docs/benchmarks.md.
bench: install
	$(PYTHON) -m benchmarks.run --out docs/benchmarks.md --json docs/benchmarks.json
