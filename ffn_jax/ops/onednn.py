"""The ``onednn`` conv route: oneDNN 3-D convolutions as XLA FFI custom calls on CPU.

Forward: one custom call computes ``post(conv(x, w) + b [+ r])`` with bias, the residual add and
ReLU fused into oneDNN's kernel as post-ops. Backward (``jax.custom_vjp``): one call computes the
kernel and bias gradients (applying the fused ReLU's mask itself), a second the input gradient;
the only tensors saved for it are the conv's input and (with ReLU) its output.

The extension is compiled on first use (``ffn_jax/ops/build.py``); ``available()`` says whether
that worked and ``unavailable_reason()`` why not. Nothing here is built or loaded at import time.

Threads: oneDNN runs OpenMP regions on the calling XLA thread; set their number with
``set_num_threads`` or ``$FFN_JAX_ONEDNN_THREADS`` (default: OpenMP's, i.e. ``OMP_NUM_THREADS``
or all cores). A batch divisible by the thread count runs as one single-threaded sub-batch per
thread (``set_batch_split`` / ``FFN_JAX_ONEDNN_BATCH_SPLIT=0`` turn that off). Set
``FFN_JAX_ONEDNN=0`` to disable the route.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading

import jax
import jax.numpy as jnp

from ffn_jax.ops import build

log = logging.getLogger(__name__)

_FWD_TARGET = "ffn_onednn_conv_fwd"
_BWD_WEIGHTS_TARGET = "ffn_onednn_conv_bwd_weights"
_BWD_DATA_TARGET = "ffn_onednn_conv_bwd_data"

_lock = threading.Lock()
_state: dict = {}  # "lib": ctypes.CDLL, or "error": str


def _load():
  with _lock:
    if "lib" in _state or "error" in _state:
      return _state.get("lib")
    try:
      if os.environ.get("FFN_JAX_ONEDNN", "1") == "0":
        raise build.BuildError("disabled by FFN_JAX_ONEDNN=0")
      lib = ctypes.CDLL(str(build.build_library()))
      for name, symbol in ((_FWD_TARGET, lib.FfnOnednnConvFwd),
                           (_BWD_WEIGHTS_TARGET, lib.FfnOnednnConvBwdWeights),
                           (_BWD_DATA_TARGET, lib.FfnOnednnConvBwdData)):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
      lib.FfnOnednnSetNumThreads.argtypes = [ctypes.c_int]
      lib.FfnOnednnSetBatchSplit.argtypes = [ctypes.c_int]
      lib.FfnOnednnImplInfo.argtypes = [ctypes.c_int64] * 7 + [ctypes.c_int, ctypes.c_char_p,
                                                                ctypes.c_int]
      threads = os.environ.get("FFN_JAX_ONEDNN_THREADS")
      if threads:
        lib.FfnOnednnSetNumThreads(int(threads))
      if os.environ.get("FFN_JAX_ONEDNN_BATCH_SPLIT", "1") == "0":
        lib.FfnOnednnSetBatchSplit(0)
      _state["lib"] = lib
    except (build.BuildError, OSError, AttributeError) as e:
      _state["error"] = f"{type(e).__name__}: {e}"
      log.warning("oneDNN conv route unavailable: %s", _state["error"])
    return _state.get("lib")


def available() -> bool:
  """Whether the extension is built and loaded (builds it on the first call)."""
  return _load() is not None


def unavailable_reason() -> str | None:
  _load()
  return _state.get("error")


def set_num_threads(n: int) -> None:
  """OpenMP threads oneDNN uses per call; 0 restores OpenMP's default."""
  lib = _load()
  if lib is not None:
    lib.FfnOnednnSetNumThreads(int(n))


def set_batch_split(on: bool) -> None:
  """Whether a batch that divides evenly over the threads runs as one single-threaded sub-batch
  per thread (default) rather than as one multi-threaded convolution."""
  lib = _load()
  if lib is not None:
    lib.FfnOnednnSetBatchSplit(int(bool(on)))


def version() -> str | None:
  lib = _load()
  if lib is None:
    return None
  v = lib.FfnOnednnVersion()
  return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def _impl_info(shape_BZYXC, cout: int, k: int, bf16: bool) -> tuple[bool, str]:
  """(whether oneDNN created all three primitives, their names or its error)."""
  lib = _load()
  if lib is None:
    return False, f"unavailable ({unavailable_reason()})"
  buf = ctypes.create_string_buffer(1024)
  failed = lib.FfnOnednnImplInfo(*shape_BZYXC, cout, k, int(bf16), buf, len(buf))
  return not failed, buf.value.decode()


def impl_info(shape_BZYXC, cout: int, k: int = 3, bf16: bool = False) -> str:
  """oneDNN's implementation names "fwd;bwd_data;bwd_weights" for one conv shape."""
  return _impl_info(shape_BZYXC, cout, k, bf16)[1]


# ISA suffixes of oneDNN implementations that multiply bfloat16 in hardware (AVX512-BF16, AMX,
# AVX2-VNNI-2, AVX10); a bf16 implementation on plain avx512_core converts in software.
_NATIVE_BF16_ISA = ("bf16", "amx", "avx2_vnni_2", "avx10")


def bf16_support() -> tuple[bool, bool, str]:
  """What oneDNN can do in bfloat16 on this CPU, asked of oneDNN itself once per process.

  Builds the forward, backward-data and backward-weights primitives of one bf16 convolution of
  the FFN's shape (oneDNN checks the CPU's ISA then). Returns (runs, native, detail): whether
  all three could be created, whether oneDNN picked kernels with bf16 instructions (rather than
  emulating them), and oneDNN's implementation names or its error.
  """
  if _load() is None:
    return False, False, f"the oneDNN route is unavailable ({unavailable_reason()})"
  return _bf16_probe()


@functools.cache
def _bf16_probe() -> tuple[bool, bool, str]:
  runs, detail = _impl_info((1, 8, 8, 8, 32), 32, 3, True)
  if not runs:
    return False, False, f"oneDNN: {detail}"
  isas = [impl.rpartition(":")[2] for impl in detail.split(";")]
  native = any(unit in isa for isa in isas for unit in _NATIVE_BF16_ISA)
  return True, native, detail


def _require():
  if _load() is None:
    raise RuntimeError(f"oneDNN conv route unavailable: {unavailable_reason()}")


def _fwd_call(x, w, b, r, relu, bf16):
  # In bf16 mode a ReLU output with no residual only feeds the next conv, which would round it
  # to bfloat16 anyway: store it as bfloat16 (half the memory traffic, no conversion pass).
  out_dtype = jnp.bfloat16 if bf16 and relu and r is None else jnp.float32
  out = jax.ShapeDtypeStruct((*x.shape[:-1], w.shape[-1]), out_dtype)
  args = (x, w, b) if r is None else (x, w, b, r)
  return jax.ffi.ffi_call(_FWD_TARGET, out, vmap_method="sequential")(
      *args, relu=relu, residual=r is not None, bf16=bf16)


def _bwd_call(x, w, g, y, relu, bf16):
  """(dx, dw, db) as two calls: weights (+ masked gradient gd), then data. XLA drops the data
  call where dx is unused, e.g. for the model's first conv, whose input is data."""
  compute = jnp.bfloat16 if bf16 else jnp.float32
  need_gd = relu or g.dtype != compute
  outs = (jax.ShapeDtypeStruct(w.shape, jnp.float32),
          jax.ShapeDtypeStruct(w.shape[-1:], jnp.float32))
  if need_gd:
    outs += (jax.ShapeDtypeStruct(g.shape, compute),)
  args = (x, w, g) if y is None else (x, w, g, y)
  res = jax.ffi.ffi_call(_BWD_WEIGHTS_TARGET, outs, vmap_method="sequential")(
      *args, relu=relu, bf16=bf16)
  dw, db = res[0], res[1]
  gd = res[2] if need_gd else g
  dx = jax.ffi.ffi_call(_BWD_DATA_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype),
                        vmap_method="sequential")(gd, w, db, bf16=bf16)
  return dx, dw, db


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _conv(x, w, b, r, relu, bf16):
  return _fwd_call(x, w, b, r, relu, bf16)


def _conv_fwd(x, w, b, r, relu, bf16):
  y = _fwd_call(x, w, b, r, relu, bf16)
  return y, (x, w, y if relu else None, r is not None)


def _conv_bwd(relu, bf16, saved, g):
  x, w, y, has_residual = saved
  dx, dw, db = _bwd_call(x, w, g, y, relu, bf16)
  dr = None
  if has_residual:
    # d(out)/d(residual) is the identity, times the ReLU mask when ReLU comes after the add.
    dr = jnp.where(y > 0, g, 0.0) if relu else g
  return dx, dw, db, dr


_conv.defvjp(_conv_fwd, _conv_bwd)


def _as_f32(a):
  return a if a.dtype == jnp.float32 else a.astype(jnp.float32)


def conv3d_fused(x_BZYXC, kernel_ZYXIO, bias_O, *, relu: bool = False, residual_BZYXO=None,
                 bf16: bool = False):
  """``relu?(conv3d(x, kernel) + bias [+ residual])``, SAME, through oneDNN.

  Args:
    x_BZYXC: input, channels-last.
    kernel_ZYXIO: kernel (odd sizes).
    bias_O: bias, or None for no bias.
    relu: apply ReLU after the bias (and residual) add.
    residual_BZYXO: optional tensor of the output's shape added before the ReLU.
    bf16: let oneDNN compute in bfloat16 with float32 accumulation (inputs/outputs stay float32).
  """
  _require()
  dtype = x_BZYXC.dtype
  if bias_O is None:
    bias_O = jnp.zeros(kernel_ZYXIO.shape[-1:], jnp.float32)
  residual = None if residual_BZYXO is None else _as_f32(residual_BZYXO)
  # bf16: convert in XLA, where the convert fuses into the producer (e.g. the ReLU before a
  # conv), and where the conv's saved input is then half the size.
  x = x_BZYXC.astype(jnp.bfloat16) if bf16 else _as_f32(x_BZYXC)
  y = _conv(x, _as_f32(kernel_ZYXIO), _as_f32(bias_O), residual, bool(relu), bool(bf16))
  return y.astype(dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32)


def conv3d(x_BZYXC, kernel_ZYXIO, precision=None):
  """Route signature of ``ffn_jax.conv``: SAME conv, no bias. ``precision`` is ignored (oneDNN
  computes in float32)."""
  del precision
  return conv3d_fused(x_BZYXC, kernel_ZYXIO, None)


def conv3d_bf16(x_BZYXC, kernel_ZYXIO, precision=None):
  """As ``conv3d`` with bfloat16 multiplies and float32 accumulation."""
  del precision
  return conv3d_fused(x_BZYXC, kernel_ZYXIO, None, bf16=True)
