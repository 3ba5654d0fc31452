"""Runs a few DistributedSteps on fixed batches and saves the final params (npz).

Usage: python step_equivalence.py OUT.npz [--devices N] ; under mpirun each rank takes its
contiguous share of every global batch, so R ranks x b must equal 1 rank x R*b.
"""
import argparse

import jax
import numpy as np

from configs import tiny
from ffn_jax import optim, parallel
from ffn_jax.model import FFN, init_params
from ffn_jax.training import distributed
from ffn_jax.training.state import TrainState

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--global-batch", type=int, default=4)
parser.add_argument("--steps", type=int, default=3)
args = parser.parse_args()

dist = parallel.init()
dist.devices = jax.local_devices()[:args.devices]
config = tiny.get_config()
config.optim.name = "momentum"
config.optim.learning_rate = 0.05
model = FFN(depth=config.model.depth, features=config.model.features, conv_impl="xla")
tx, _ = optim.make_optimizer(config.optim, args.global_batch)
params = init_params(model, jax.random.PRNGKey(0), config.model.fov_size_zyx)
state = TrainState(step=np.int32(0), params=params, opt_state=tx.init(params),
                   rng=np.zeros(2, np.uint32))
state = parallel.put_on_first_device(state, dist)
step = distributed.DistributedStep(dist, model, tx)
per_rank = args.global_batch // dist.size
rng = np.random.default_rng(123)
for _ in range(args.steps):
  shape = (args.global_batch, 9, 9, 9, 1)
  batch = {"image": rng.normal(size=shape).astype(np.float32),
           "seed": rng.normal(size=shape).astype(np.float32),
           "labels": (rng.random(shape) > 0.5).astype(np.float32)}
  mine = {k: v[dist.rank * per_rank:(dist.rank + 1) * per_rank] for k, v in batch.items()}
  state, stats, logits, _ = step(state, mine)
  assert logits.shape == (per_rank, 9, 9, 9, 1)
flat = {jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]}
np.savez(args.out.replace(".npz", f".rank{dist.rank}.npz"), loss=np.float32(stats["loss"]), **flat)
