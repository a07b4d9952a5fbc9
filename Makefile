PYTHON ?= python3
DEMO_WORKDIR ?= logs/digits_demo

.PHONY: install install-dev demo test benchmark gpu-check mutation-check

install:
	$(PYTHON) -m pip install -q -r requirements.txt

install-dev:
	$(PYTHON) -m pip install -q -r requirements-dev.txt

# The main job: a 1-rectified flow on scikit-learn's digits (no download), about 12 minutes on 2 CPU cores.
demo: install
	$(PYTHON) main.py --config configs/rectified_flow/digits_rf_gaussian_ddpmpp_demo.py --mode train --workdir $(DEMO_WORKDIR)

# Lint (ruff.toml: 120 columns, pyflakes, import order), then the tests.
test: install-dev
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q

benchmark: install
	$(PYTHON) benchmarks/train_step.py
	$(PYTHON) benchmarks/sampling_speed.py --quick

# The one device check (a CUDA machine, within 8 minutes): CUDA tests, GPU report, demo; writes logs/gpu_check.md.
gpu-check:  # No install: a GPU machine may lack a package index (README: carry the wheels).
	$(PYTHON) benchmarks/gpu_check.py

# Seeds known faults into copies of the tree and checks that the tests catch each (not part of `make test`).
mutation-check: install-dev
	$(PYTHON) -m tests.mutation_check
