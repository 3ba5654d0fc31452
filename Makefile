# Two commands: `make demo` (set up, train a small FFN on synthetic data, segment and score a
# held-out synthetic volume) and `make test`
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
DEMO_FLAGS ?=
DEMO_RUN = PATH="$(VBIN):$$PATH" $(PY)

# Trains configs/demo.py from scratch on a synthetic volume (seed 0; its final eval and
# calibration on another, seed 1000), segments a third one (seed 2000) with the trained model,
# and scores it: VI, and a PNG of image | truth | segmentation. A rerun resumes or reuses.
demo: setup
	test -e $(DEMO_WORKDIR)/heldout/labels.zarr || \
	  $(DEMO_RUN) -m ffn_jax.data.synthetic --out $(DEMO_WORKDIR)/heldout --seed 2000
	$(DEMO_RUN) train.py --config configs/demo.py --workdir $(DEMO_WORKDIR)/model $(DEMO_FLAGS)
	$(DEMO_RUN) infer.py --config configs/synthetic_infer.py --workdir $(DEMO_WORKDIR)/segment \
	  --config.checkpoint=$(DEMO_WORKDIR)/model --config.image=$(DEMO_WORKDIR)/heldout/image.zarr
	$(DEMO_RUN) -m ffn_jax.evaluate --summary --segmentation $(DEMO_WORKDIR)/segment/segmentation.zarr \
	  --truth $(DEMO_WORKDIR)/heldout/labels.zarr --image $(DEMO_WORKDIR)/heldout/image.zarr \
	  --preview $(DEMO_WORKDIR)/preview.png

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
