# Two commands: `make demo` (set up + train a small FFN on synthetic data) and `make test`
# (the full test suite, as CI runs it); `make test-fast` is the tier for day-to-day work.
PYTHON ?= python3
VENV ?= .venv
VBIN := $(abspath $(VENV))/bin
PY := $(VBIN)/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

# MPI comes from PyPI: the mpich wheel provides mpicc/mpirun, which mpi4jax's source build needs on
# PATH. CUDA_PATH=/dev/null stops mpi4jax from trying a CUDA build when nvcc exists without CUDA.
# --no-cache-dir for mpi4jax: a cached wheel is tied to the MPI it was built against.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "mpich>=4.1"
	PATH="$(VBIN):$$PATH" CUDA_PATH=/dev/null $(PY) -m pip install --quiet --no-cache-dir \
	  "jax>=0.10.2,<0.11" "mpi4py>=4.0" "mpi4jax>=0.9.1"
	PATH="$(VBIN):$$PATH" $(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

DEMO_WORKDIR ?= runs/demo
DEMO_FLAGS ?= --config.max_steps=300

demo: setup
	PATH="$(VBIN):$$PATH" $(PY) train.py --config configs/synthetic.py --workdir $(DEMO_WORKDIR) \
	  $(DEMO_FLAGS)
	@echo "Results: $(DEMO_WORKDIR)/metrics.jsonl (metrics), $(DEMO_WORKDIR)/checkpoints/ (orbax checkpoints)"

# Two pytest workers (pytest-xdist), each test file on one worker: most tests wait on a
# subprocess's imports and compiles on one core, so two keep both cores busy.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: setup
	PATH="$(VBIN):$$PATH" $(PYTEST) --durations=15

test-fast: setup
	PATH="$(VBIN):$$PATH" $(PYTEST) -m "not slow" --durations=10

clean:
	rm -rf runs .pytest_cache
