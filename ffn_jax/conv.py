"""3-D convolution routes for the FFN conv stack (all SAME padding, stride 1, NDHWC / DHWIO).

XLA's native 3-D convolution on CPU is 5-8x slower than oneDNN (see ../shared/docs/PERFORMANCE.md).
Every route here computes the same cross-correlation as TensorFlow's Conv3D:

- ``xla``: ``lax.conv_general_dilated`` in 3-D, the reference (what ``flax.linen.Conv`` does).
- ``im2col_kz``: the kz slices of the input are stacked on the channel axis (3*Cin channels) and a
  2-D (ky, kx) convolution is run with depth folded into the batch. 3-4x faster than ``xla`` on CPU.
- ``onednn``: oneDNN through XLA FFI custom calls (``ffn_jax/ops``), CPU only, compiled on first
  use; ~1.5x faster than ``im2col_kz`` forward and in training (bench/conv_stack.py).
  ``onednn_bf16``: the same with bfloat16 multiplies (float32 accumulation), ~1.7x faster again
  but not exact to float32 tolerance, so opt-in only.

``conv3d(x, kernel, bias, impl)`` dispatches; ``"auto"`` picks per backend: ``xla`` off CPU;
on CPU ``onednn`` where the extension builds and loads, else ``im2col_kz``. The environment
variable ``FFN_JAX_CONV_IMPL`` overrides what ``"auto"`` picks.
"""
from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from ffn_jax.ops import onednn as _onednn

_DN_3D = ("NDHWC", "DHWIO", "NDHWC")
_DN_2D = ("NHWC", "HWIO", "NHWC")


def _conv_xla(x_BZYXC, kernel_ZYXIO, precision=None):
  return lax.conv_general_dilated(
      x_BZYXC, kernel_ZYXIO, window_strides=(1, 1, 1), padding="SAME",
      dimension_numbers=_DN_3D, precision=precision)


def _conv_im2col_kz(x_BZYXC, kernel_ZYXIO, precision=None):
  kz, ky, kx, cin, cout = kernel_ZYXIO.shape
  if kz == 1 and ky == 1 and kx == 1:
    return jnp.einsum("bzyxc,co->bzyxo", x_BZYXC, kernel_ZYXIO[0, 0, 0], precision=precision)
  b, z, y, x, _ = x_BZYXC.shape
  pad = kz // 2
  xp = jnp.pad(x_BZYXC, ((0, 0), (pad, kz - 1 - pad), (0, 0), (0, 0), (0, 0)))
  # Channel index = dz * cin + c, matching kernel.reshape below.
  cols = jnp.concatenate([xp[:, dz:dz + z] for dz in range(kz)], axis=-1)
  cols = cols.reshape(b * z, y, x, kz * cin)
  k2 = jnp.transpose(kernel_ZYXIO, (1, 2, 0, 3, 4)).reshape(ky, kx, kz * cin, cout)
  out = lax.conv_general_dilated(
      cols, k2, window_strides=(1, 1), padding="SAME", dimension_numbers=_DN_2D,
      precision=precision)
  return out.reshape(b, z, y, x, cout)


_ROUTES: dict[str, Callable] = {
    "xla": _conv_xla, "im2col_kz": _conv_im2col_kz, "onednn": _onednn.conv3d,
}
# Opt-in routes that trade accuracy for speed: selectable by name, never picked by "auto", and
# not in available_routes() (whose routes all match "xla" to float32 tolerance).
_APPROX_ROUTES: dict[str, Callable] = {"onednn_bf16": _onednn.conv3d_bf16}
_NEEDS_ONEDNN = ("onednn", "onednn_bf16")


def available_routes() -> list[str]:
  """Routes usable here (``onednn`` only where its extension builds and loads)."""
  return ["auto", *(r for r in _ROUTES if r not in _NEEDS_ONEDNN or _onednn.available())]


def resolve(impl: str) -> str:
  """Maps ``auto`` to the fastest route available on the default backend."""
  if impl == "auto":
    impl = os.environ.get("FFN_JAX_CONV_IMPL") or "auto"
  if impl == "auto":
    if jax.default_backend() != "cpu":
      return "xla"
    return "onednn" if _onednn.available() else "im2col_kz"
  if impl not in _ROUTES and impl not in _APPROX_ROUTES:
    raise ValueError(f"unknown conv_impl {impl!r}; choose one of "
                     f"{[*available_routes(), *_APPROX_ROUTES]}")
  if impl in _NEEDS_ONEDNN and not _onednn.available():
    raise ValueError(f"conv_impl {impl!r} unavailable: {_onednn.unavailable_reason()}")
  return impl


def conv3d(x_BZYXC, kernel_ZYXIO, bias_O=None, impl: str = "auto", precision=None):
  """SAME 3-D cross-correlation with optional bias through the selected route."""
  name = resolve(impl)
  y = _ROUTES.get(name, _APPROX_ROUTES.get(name))(x_BZYXC, kernel_ZYXIO, precision)
  if bias_O is not None:
    y = y + bias_O
  return y
