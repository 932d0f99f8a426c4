# The two quick-start commands: `make demo` and `make test`. Both install first.
PYTHON ?= python3
# A pinned CPU build: an open torch range can pull a multi-GB CUDA build on Linux.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint bench

install:
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	fxalign demo

test: install
	$(PYTHON) -m pytest

lint: install
	ruff check fxalign tests benchmarks
	ruff format --check fxalign tests benchmarks
	mypy

# Full benchmark (about 20 minutes on the 2-core CI machine); rewrites docs/benchmarks.md.
bench: install
	$(PYTHON) -m benchmarks.run --out docs/benchmarks.md --json docs/benchmarks.json
