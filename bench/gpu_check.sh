#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on a machine with jax (CUDA), flax, optax, orbax,
# tensorstore and torch but no internet and no MPI, run from the checkout:
#   bash bench/gpu_check.sh DATA_DIR [--steps logits,conv_stack,train,inference]
# DATA_DIR: a copy of ../shared/data's google_ffn_fib25/ and fib25_training_sample2/ (16 MB + 5 MB)
# inside the checkout (git-ignored, e.g. .gpu_data/), carried with it. Pure wheels missing there
# (ml_collections) go in .whl/: pip download --no-deps --only-binary=:all: -d .whl ml_collections
# Ends within 5 minutes (timeout 300) with one JSON line.
set -euo pipefail
DATA=${1:?usage: bash bench/gpu_check.sh DATA_DIR [gpu_check.py args]}
shift
cd "$(dirname "$0")/.."
SITE=${FFN_GPU_SITE:-/tmp/ffn_site}
if ! python -c "import ml_collections" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "error: ml_collections missing and no .whl/ to install it from" >&2; exit 2; }
  pip install --quiet --no-index --no-deps --target "$SITE" .whl/*.whl
fi
export PYTHONPATH="$PWD:$SITE:${PYTHONPATH:-}"
exec timeout 300 python bench/gpu_check.py --data "$DATA" "$@"
