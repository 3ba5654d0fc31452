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

- ``xla_bf16``: ``xla`` with bfloat16 operands and float32 accumulation and output (cuDNN bf16
  on GPUs).

``conv3d(x, kernel, bias, impl)`` dispatches; ``"auto"`` picks per backend: ``xla`` off CPU;
on CPU ``onednn`` where the extension builds and loads, else ``im2col_kz``. The environment
variable ``FFN_JAX_CONV_IMPL`` overrides what ``"auto"`` picks.

Precision is chosen apart from the route: ``select(conv_impl, compute_dtype)`` maps a route and
``compute_dtype`` (``float32``, ``bfloat16`` or ``auto``) to the route that runs, e.g.
``onednn`` + ``bfloat16`` -> ``onednn_bf16``, ``xla`` + ``bfloat16`` -> ``xla_bf16``. In every
bf16 route the operands are bfloat16 and the accumulation float32; parameters, activations between
convs, gradients, optimizer state and the loss stay float32. ``auto`` takes bfloat16 where the
hardware multiplies it natively (``native_bf16``) and ``AUTO_PICKS_BF16`` is on.

What the CPU can do in bf16 is asked of oneDNN once per process (``ops.onednn.bf16_support``
builds one bf16 convolution), not read from CPU flags: on an AVX2-only CPU oneDNN cannot build
one, so ``compute_dtype=bfloat16`` runs as ``xla_bf16`` and an explicit ``onednn_bf16`` is
refused with the reason; with plain AVX-512 oneDNN emulates bf16, so ``auto`` keeps float32.
"""
from __future__ import annotations

import functools
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


def _conv_xla_bf16(x_BZYXC, kernel_ZYXIO, precision=None):
  del precision  # bf16 operands are the precision
  return lax.conv_general_dilated(
      x_BZYXC.astype(jnp.bfloat16), kernel_ZYXIO.astype(jnp.bfloat16), window_strides=(1, 1, 1),
      padding="SAME", dimension_numbers=_DN_3D, preferred_element_type=jnp.float32)


_ROUTES: dict[str, Callable] = {
    "xla": _conv_xla, "im2col_kz": _conv_im2col_kz, "onednn": _onednn.conv3d,
}
# Opt-in routes that trade accuracy for speed: selectable by name, never picked by "auto", and
# not in available_routes() (whose routes all match "xla" to float32 tolerance).
_APPROX_ROUTES: dict[str, Callable] = {"onednn_bf16": _onednn.conv3d_bf16,
                                        "xla_bf16": _conv_xla_bf16}
_NEEDS_ONEDNN = ("onednn", "onednn_bf16")
_BF16_OF = {"onednn": "onednn_bf16", "onednn_bf16": "onednn_bf16", "xla": "xla_bf16",
            "im2col_kz": "xla_bf16", "xla_bf16": "xla_bf16"}
COMPUTE_DTYPES = ("float32", "bfloat16", "auto")
# What compute_dtype="auto" does where the hardware has native bf16: decided by held-out
# segmentation quality, float32 against bfloat16 over seeds (docs/benchmarks.md section 6:
# bf16's held-out VI was within float32's seed-to-seed spread or better, 1.5x the speed).
AUTO_PICKS_BF16 = True


def _cpu_flags() -> set[str]:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def cpu_bf16_units() -> str:
  """The CPU's vector units that bfloat16 convolutions depend on, for messages: e.g.
  "CPU has avx2; lacks avx512f, avx512_bf16, amx_bf16"."""
  flags = _cpu_flags()
  if not flags:
    return "CPU flags unknown"
  units = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
  has = [u for u in units if u in flags]
  lacks = [u for u in units if u not in flags]
  return "; ".join(part for part in (
      f"CPU has {', '.join(has)}" if has else "", f"lacks {', '.join(lacks)}" if lacks else "")
      if part)


def onednn_bf16() -> tuple[bool, str]:
  """Whether the ``onednn_bf16`` route runs here (oneDNN, asked once, builds a bf16
  convolution on this CPU), and why or why not (names the CPU's units and oneDNN's kernels)."""
  runs, native, detail = _onednn.bf16_support()
  if not runs:
    return False, f"oneDNN cannot build a bfloat16 convolution here ({cpu_bf16_units()}; {detail})"
  kind = "native" if native else "emulated"
  return True, f"oneDNN builds {kind} bfloat16 convolutions here ({cpu_bf16_units()}; {detail})"


@functools.cache
def _xla_bf16_error(backend: str) -> str | None:
  """None where XLA compiles and runs a bf16 convolution on ``backend``, else its error."""
  del backend  # the cache key: jax.default_backend() when asked
  try:
    x = jnp.ones((1, 3, 3, 3, 2), jnp.float32)
    jax.block_until_ready(jax.jit(_conv_xla_bf16)(x, jnp.ones((3, 3, 3, 2, 2), jnp.float32)))
  except Exception as e:  # noqa: BLE001 - any failure means the route cannot run here
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
  return None


def native_bf16() -> tuple[bool, str]:
  """Whether the default backend multiplies bfloat16 natively here, and why (for the log).

  On CPU this is oneDNN's answer, not the CPU's flags: a bf16 convolution whose kernels use
  bf16 instructions (AVX512-BF16, AMX, ...). Where oneDNN only emulates bf16 (plain AVX-512) or
  cannot build it at all (AVX2), bf16 is not native.
  """
  backend = jax.default_backend()
  if backend == "cpu":
    runs, native, detail = _onednn.bf16_support()
    if native:
      return True, f"oneDNN multiplies bfloat16 natively on this CPU ({detail})"
    if runs:
      return False, f"oneDNN only emulates bfloat16 on this CPU ({cpu_bf16_units()})"
    return False, onednn_bf16()[1]
  capability = getattr(jax.devices()[0], "compute_capability", None)
  try:
    major = int(str(capability).split(".")[0])
  except ValueError:
    major = 0
  if backend in ("gpu", "cuda") and major >= 8:
    return True, f"GPU of compute capability {capability} (bf16 tensor cores)"
  return False, f"backend {backend} (compute capability {capability}) has no native bf16 here"


def _bf16_route(route: str, why: str) -> tuple[str, str]:
  """The bfloat16 twin of ``route`` that runs here, and the reason, extended where it falls
  back: ``onednn`` goes to ``xla_bf16`` where oneDNN cannot build a bf16 convolution.

  Raises:
    ValueError: no bf16 route runs here.
  """
  route = _BF16_OF[route]
  if route == "onednn_bf16":
    runs, reason = onednn_bf16()
    if runs:
      return route, why
    route, why = "xla_bf16", f"{why}; xla_bf16, since {reason}"
  error = _xla_bf16_error(jax.default_backend())
  if error:
    raise ValueError(f"no bfloat16 conv route runs here (xla_bf16: {error}); "
                     "set compute_dtype=float32")
  return route, why


def select(impl: str = "auto", compute_dtype: str = "auto") -> tuple[str, str, str]:
  """The route that runs for ``conv_impl`` and ``compute_dtype``: (route, dtype, why).

  ``dtype`` is ``float32`` or ``bfloat16``, as computed. ``conv_impl=onednn_bf16`` (the older
  spelling of ``onednn`` + ``bfloat16``) implies bfloat16.

  Raises:
    ValueError: an unknown route or dtype, an unavailable route, or a bf16 route with
      ``compute_dtype=float32``.
  """
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"unknown compute_dtype {compute_dtype!r}; choose one of {COMPUTE_DTYPES}")
  route = resolve(impl)
  if route in _APPROX_ROUTES:
    if compute_dtype == "float32":
      raise ValueError(f"conv_impl {impl!r} computes in bfloat16, but compute_dtype is float32; "
                       "set conv_impl=auto (or onednn / xla) for float32")
    return route, "bfloat16", f"conv_impl={impl}"
  if compute_dtype == "auto":
    native, why = native_bf16()
    # On CPU only the oneDNN route multiplies bf16 natively; XLA's CPU bf16 conv does not.
    native = native and (jax.default_backend() != "cpu" or route == "onednn")
    if native and AUTO_PICKS_BF16:
      compute_dtype, why = "bfloat16", f"compute_dtype=auto: {why}"
    elif native:
      compute_dtype = "float32"
      why = f"compute_dtype=auto: float32 ({why}, but bf16 is not the default)"
    else:
      compute_dtype, why = "float32", f"compute_dtype=auto: float32 ({why})"
  else:
    why = f"compute_dtype={compute_dtype}"
  if compute_dtype == "bfloat16":
    route, why = _bf16_route(route, why)
  return route, compute_dtype, why


def choose(impl: str = "auto", compute_dtype: str = "auto", where: str = "") -> tuple[str, str, str]:
  """``select`` for train.py, infer.py and the training eval alike: (route, dtype, why), with a
  bad or unavailable choice raised as a ``UserError`` (one line, exit 2) prefixed by ``where``
  (the config section, e.g. ``model`` or ``eval``)."""
  from ffn_jax.errors import UserError
  try:
    return select(str(impl), str(compute_dtype))
  except ValueError as e:
    raise UserError(f"{where}: {e}" if where else str(e)) from None


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
  if impl == "onednn_bf16":
    runs, reason = onednn_bf16()
    if not runs:
      raise ValueError(f"conv_impl 'onednn_bf16' cannot run: {reason}; "
                       "use compute_dtype=bfloat16 (which picks a bf16 route that runs) or float32")
  return impl


def conv3d(x_BZYXC, kernel_ZYXIO, bias_O=None, impl: str = "auto", precision=None):
  """SAME 3-D cross-correlation with optional bias through the selected route."""
  name = resolve(impl)
  y = _ROUTES.get(name, _APPROX_ROUTES.get(name))(x_BZYXC, kernel_ZYXIO, precision)
  if bias_O is not None:
    y = y + bias_O
  return y


_FUSED: dict[str, Callable] = {
    "onednn": _onednn.conv3d_fused,
    "onednn_bf16": functools.partial(_onednn.conv3d_fused, bf16=True),
}


def conv3d_block(x_BZYXC, kernel_ZYXIO, bias_O=None, *, impl: str = "auto", relu: bool = False,
                 residual_BZYXO=None):
  """``relu?(conv3d(x, kernel) + bias [+ residual])`` through route ``impl`` (SAME, stride 1).

  The oneDNN routes do it in one kernel (post-ops); every other route composes ``conv3d`` with
  the add and the ReLU, which is exactly what the unfused model wrote (bitwise the same)."""
  name = resolve(impl)
  fused = _FUSED.get(name)
  if fused is not None:
    return fused(x_BZYXC, kernel_ZYXIO, bias_O, relu=relu, residual_BZYXO=residual_BZYXO)
  y = conv3d(x_BZYXC, kernel_ZYXIO, bias_O, impl=name)
  if residual_BZYXO is not None:
    y = residual_BZYXO + y
  return jax.nn.relu(y) if relu else y
