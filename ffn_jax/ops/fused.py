"""Conv + bias [+ residual] [+ ReLU] as one op where the route can fuse it.

``conv3d_block(x, kernel, bias, impl=..., relu=..., residual=...)`` computes
``relu?(conv3d(x, kernel) + bias + residual)``. Routes listed in ``_FUSED`` do it in one kernel
(oneDNN post-ops); every other route composes ``ffn_jax.conv.conv3d`` with the add and the ReLU,
which is exactly what the unfused model wrote, so its outputs are bitwise unchanged.
"""
from __future__ import annotations

import functools

import jax

from ffn_jax import conv as conv_lib
from ffn_jax.ops import onednn

_FUSED = {
    "onednn": onednn.conv3d_fused,
    "onednn_bf16": functools.partial(onednn.conv3d_fused, bf16=True),
}


def conv3d_block(x_BZYXC, kernel_ZYXIO, bias_O=None, *, impl: str = "auto", relu: bool = False,
                 residual_BZYXO=None):
  """``relu?(conv3d(x, kernel) + bias [+ residual])`` through route ``impl`` (SAME, stride 1)."""
  name = conv_lib.resolve(impl)
  fused = _FUSED.get(name)
  if fused is not None:
    return fused(x_BZYXC, kernel_ZYXIO, bias_O, relu=relu, residual_BZYXO=residual_BZYXO)
  y = conv_lib.conv3d(x_BZYXC, kernel_ZYXIO, bias_O, impl=name)
  if residual_BZYXO is not None:
    y = residual_BZYXO + y
  return jax.nn.relu(y) if relu else y
