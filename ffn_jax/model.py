"""The FFN residual 3-D conv stack (Google's ``ConvStack3DFFNModel``) as a pure Flax module.

Parameter names follow Google's TensorFlow checkpoint (``seed_update/conv{i}_{a,b}``,
``seed_update/conv_lom``) with ``weights -> kernel`` and ``biases -> bias``, so the pretrained
FIB-25 model imports by renaming alone.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffn_jax import conv as conv_lib


# Conv kernel initializers by name. ``glorot_uniform`` is what Google's current
# ConvStack3DFFNModel gets (tf.contrib.layers.conv3d's default) and what trains on short budgets;
# ``truncated_normal`` (sd 0.01) is the init Google's released FIB-25 model was first trained
# from: over 24 stacked convs it leaves the residual stream and its gradients tiny, and training
# stalls for tens of thousands of FOVs.
KERNEL_INITS = {
    "glorot_uniform": nn.initializers.glorot_uniform(),
    "truncated_normal": nn.initializers.truncated_normal(stddev=0.01),
}


def kernel_initializer(name: str):
  if name not in KERNEL_INITS:
    raise ValueError(f"unknown kernel_init {name!r}; choose one of {sorted(KERNEL_INITS)}")
  return KERNEL_INITS[name]


def logit(p: float) -> float:
  """Probability -> logit, as FFN thresholds are given as probabilities."""
  return math.log(p / (1.0 - p))


class Conv3D(nn.Module):
  """SAME 3-D convolution with bias whose compute route is selectable (see ``ffn_jax.conv``).

  Computes ``relu?(conv(x) + bias [+ residual])``; routes that can fuse the add and the ReLU into
  the conv kernel do (``ffn_jax.conv.conv3d_block``).
  """
  features: int
  kernel_size: tuple[int, int, int] = (3, 3, 3)
  impl: str = "auto"
  kernel_init: str = "glorot_uniform"

  @nn.compact
  def __call__(self, x_BZYXC, residual_BZYXO=None, relu: bool = False):
    cin = x_BZYXC.shape[-1]
    kernel = self.param("kernel", kernel_initializer(self.kernel_init),
                        (*self.kernel_size, cin, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return conv_lib.conv3d_block(x_BZYXC, kernel, bias, impl=self.impl, relu=relu,
                              residual_BZYXO=residual_BZYXO)


class FFN(nn.Module):
  """Residual conv stack; returns updated seed logits (seed + predicted update).

  Attributes:
    depth: number of residual modules + 1 (Google's ``depth``; 12 for FIB-25).
    features: feature maps per conv (32).
    conv_impl: conv route, see ``ffn_jax.conv.available_routes()``.
    kernel_init: conv kernel initializer, a key of ``KERNEL_INITS``.
  """
  depth: int = 12
  features: int = 32
  conv_impl: str = "auto"
  kernel_init: str = "glorot_uniform"

  @nn.compact
  def __call__(self, image_BZYX1, seed_BZYX1):
    conv = lambda name, k=(3, 3, 3), f=self.features: Conv3D(
        f, k, self.conv_impl, self.kernel_init, name=name)
    x = jnp.concatenate([image_BZYX1, seed_BZYX1], axis=-1)
    x = conv("conv0_a")(x, relu=True)
    x = conv("conv0_b")(x)
    for i in range(1, self.depth):
      h = nn.relu(x)
      h = conv(f"conv{i}_a")(h, relu=True)
      x = conv(f"conv{i}_b")(h, residual_BZYXO=x)  # x + conv(h)
    # seed + update, the update being the 1x1x1 conv.
    return conv("conv_lom", (1, 1, 1), 1)(nn.relu(x), residual_BZYXO=seed_BZYX1)


def init_params(model: FFN, rng, fov_size_zyx) -> dict:
  """Initial parameters for a batch-1 input of the given FOV size."""
  shape = (1, *fov_size_zyx, 1)
  return model.init(rng, jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))["params"]


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
