"""Every conv route computes what the ``xla`` reference computes: forward, gradients, fusions.

The oneDNN tests skip, saying why, where the extension cannot be built or loaded (no g++, no
``onednn-devel-cpu-gomp``); the first run on a machine compiles it (~10 s, then cached).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffn_jax import conv as conv_lib
from ffn_jax import model as model_lib
from ffn_jax.ops import build, onednn

ONEDNN_SKIP = pytest.mark.skipif(not onednn.available(),
                                 reason=f"oneDNN extension unavailable: {onednn.unavailable_reason()}")
# Whether oneDNN builds a bf16 convolution on this CPU (not on AVX2-only ones); the reason names
# the CPU's units and oneDNN's answer.
ONEDNN_BF16_SKIP = pytest.mark.skipif(not conv_lib.onednn_bf16()[0],
                                      reason=conv_lib.onednn_bf16()[1])
F32_ROUTES = ["im2col_kz", pytest.param("onednn", marks=ONEDNN_SKIP)]
# bfloat16 products (8-bit mantissa) with float32 sums: ~1e-2 relative, so its own tolerance.
ALL_ROUTES = [*F32_ROUTES, pytest.param("onednn_bf16", marks=ONEDNN_BF16_SKIP), "xla_bf16"]
TOL = {"im2col_kz": 2e-5, "onednn": 2e-5, "onednn_bf16": 3e-2, "xla_bf16": 3e-2}


def _close(actual, expected, tol):
  """|actual - expected| <= tol * max|expected| elementwise (scale-aware float tolerance)."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape and actual.dtype == expected.dtype
  scale = float(np.max(np.abs(expected))) or 1.0
  err = float(np.max(np.abs(actual - expected)))
  assert err <= tol * scale, f"max abs err {err:.3g} > {tol:g} * {scale:.3g}"


def _normal(rng, shape, scale=1.0):
  # numpy, not jax.random: compiling threefry costs seconds per shape on CPU.
  return jnp.asarray(rng.normal(0.0, scale, shape).astype(np.float32))


def _inputs(shape_x, kernel_zyx, cout, seed=0):
  rng = np.random.default_rng(seed)
  cin = shape_x[-1]
  x = _normal(rng, shape_x)
  w = _normal(rng, (*kernel_zyx, cin, cout), 1 / np.sqrt(np.prod(kernel_zyx) * cin))
  b = _normal(rng, (cout,))
  out_shape = (*shape_x[:-1], cout)
  return x, w, b, _normal(rng, out_shape), _normal(rng, out_shape)


def _reference(x, w, b, residual=None, relu=False):
  y = conv_lib.conv3d(x, w, b, impl="xla", precision=jax.lax.Precision.HIGHEST)
  if residual is not None:
    y = residual + y
  return jax.nn.relu(y) if relu else y


@functools.lru_cache(maxsize=None)
def _reference_outputs(shape_x, kernel, cout):
  """xla's output and (input, kernel, bias) gradients for one case, shared by all routes."""
  x, w, b, _, ct = _inputs(shape_x, kernel, cout)
  loss = lambda x, w, b: jnp.sum(_reference(x, w, b) * ct)
  return jax.jit(_reference)(x, w, b), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, b)


SHAPES = [
    ((2, 5, 6, 7, 3), (3, 3, 3), 4),     # odd, non-cubic volume
    ((1, 4, 4, 4, 8), (1, 1, 1), 1),     # the 1x1x1 conv_lom shape (32 -> 1 in the model)
    ((1, 6, 5, 4, 2), (3, 3, 3), 8),     # conv0_a: 2 input channels
    ((1, 5, 5, 5, 4), (1, 3, 3), 5),     # anisotropic kernel
]


@pytest.mark.parametrize("route", ALL_ROUTES)
@pytest.mark.parametrize("shape_x,kernel,cout", SHAPES)
def test_forward_and_gradients_match_xla(route, shape_x, kernel, cout):
  x, w, b, _, ct = _inputs(shape_x, kernel, cout)
  want_y, want = _reference_outputs(shape_x, kernel, cout)
  conv = lambda x, w, b: conv_lib.conv3d(x, w, b, impl=route)
  _close(jax.jit(conv)(x, w, b), want_y, TOL[route])
  loss = lambda x, w, b: jnp.sum(conv(x, w, b) * ct)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, b)
  for name, g, r in zip(("input", "kernel", "bias"), grads, want):
    try:
      _close(g, r, TOL[route])
    except AssertionError as e:
      raise AssertionError(f"d/d{name}: {e}") from None


@pytest.mark.parametrize("route", ["xla", *ALL_ROUTES])
@pytest.mark.parametrize("relu,with_residual", [(True, False), (False, True), (True, True)])
def test_fused_block_matches_composition(route, relu, with_residual):
  x, w, b, r, ct = _inputs((2, 5, 4, 6, 4), (3, 3, 3), 4, seed=1)
  r = r if with_residual else None
  block = lambda x, w, b, r: conv_lib.conv3d_block(x, w, b, impl=route, relu=relu, residual_BZYXO=r)
  ref = lambda x, w, b, r: _reference(x, w, b, r, relu)
  tol = TOL.get(route, 2e-5)
  _close(jax.jit(block)(x, w, b, r), jax.jit(ref)(x, w, b, r), tol)

  argnums = (0, 1, 2, 3) if with_residual else (0, 1, 2)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * ct)
  for g, want in zip(jax.jit(jax.grad(loss(block), argnums))(x, w, b, r),
                     jax.jit(jax.grad(loss(ref), argnums))(x, w, b, r)):
    _close(g, want, tol)


@ONEDNN_SKIP
def test_onednn_even_kernel_same_padding_matches_xla():
  # XLA's SAME puts the extra pad row at the end; oneDNN gets explicit (low, high) pads.
  x, w, b, _, _ = _inputs((1, 5, 6, 4, 3), (2, 3, 4), 2, seed=2)
  _close(conv_lib.conv3d(x, w, b, impl="onednn"), _reference(x, w, b), 2e-5)


@pytest.mark.parametrize("route", [pytest.param("onednn", marks=ONEDNN_SKIP),
                                   pytest.param("onednn_bf16", marks=ONEDNN_BF16_SKIP)])
def test_onednn_batch_split_matches_one_multithreaded_call(route):
  # Batch 4 on 2+ threads runs as per-thread sub-batches; the kernel gradients are summed.
  x, w, b, r, ct = _inputs((4, 3, 4, 5, 6), (3, 3, 3), 6, seed=7)
  def run():
    f = lambda x, w, b, r: conv_lib.conv3d_block(x, w, b, impl=route, relu=True, residual_BZYXO=r)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * ct), argnums=(0, 1, 2, 3)))(x, w, b, r)
    return (jax.jit(f)(x, w, b, r), *grads)
  split = run()
  onednn.set_batch_split(False)
  try:
    whole = run()
  finally:
    onednn.set_batch_split(True)
  for a, c in zip(split, whole):
    _close(a, c, 1e-6 if route == "onednn" else 1e-2)


@ONEDNN_SKIP
def test_onednn_under_vmap_and_batch_one():
  x, w, b, _, _ = _inputs((3, 1, 4, 5, 6, 2), (3, 3, 3), 3, seed=3)
  got = jax.vmap(lambda x: conv_lib.conv3d(x, w, b, impl="onednn"))(x)
  want = jax.vmap(lambda x: _reference(x, w, b))(x)
  _close(got, want, 2e-5)


@functools.lru_cache(maxsize=None)
def _small_ffn_case():
  fov = (7, 8, 9)
  rng = np.random.default_rng(4)
  image = jnp.asarray(rng.random((2, *fov, 1), dtype=np.float32))
  seed = _normal(rng, (2, *fov, 1))
  model = model_lib.FFN(depth=3, features=8, conv_impl="xla")
  shapes = jax.eval_shape(lambda: model_lib.init_params(model, jax.random.PRNGKey(0), fov))
  # Weights at ~unit gain so that every layer matters to the output; biases nonzero.
  params = jax.tree.map(
      lambda p: _normal(rng, p.shape, 1 / np.sqrt(np.prod(p.shape[:-1])) if len(p.shape) == 5
                        else 0.1), shapes)
  return params, image, seed


def _small_ffn_apply(impl):
  _, image, seed = _small_ffn_case()
  return lambda p: model_lib.FFN(depth=3, features=8, conv_impl=impl).apply(
      {"params": p}, image, seed)


@functools.lru_cache(maxsize=None)
def _small_ffn_reference():
  params, _, seed = _small_ffn_case()
  with jax.default_matmul_precision("highest"):
    want = jax.jit(_small_ffn_apply("xla"))(params)
    want_grads = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(_small_ffn_apply("xla")(p)))))(params)
  assert float(jnp.std(want - seed)) > 1e-2  # the stack does change the seed
  return want, want_grads


@pytest.mark.slow
@pytest.mark.parametrize("route", ALL_ROUTES)
def test_full_ffn_forward_and_parameter_gradients_match_xla(route):
  params, image, seed = _small_ffn_case()

  want, want_grads = _small_ffn_reference()
  apply = _small_ffn_apply
  _close(jax.jit(apply(route))(params), want, TOL[route])
  grads = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(apply(route)(p)))))(params)
  flat = jax.tree_util.tree_leaves_with_path(grads)
  for (path, g), r in zip(flat, jax.tree_util.tree_leaves(want_grads)):
    try:
      _close(g, r, 5 * TOL[route])  # gradients pass through all layers: a little more slack
    except AssertionError as e:
      raise AssertionError(f"{jax.tree_util.keystr(path)}: {e}") from None


def test_param_names_and_shapes_do_not_depend_on_route():
  fov = (5, 5, 5)
  shapes = lambda impl: jax.tree.map(lambda p: p.shape, jax.eval_shape(
      lambda: model_lib.init_params(model_lib.FFN(depth=2, features=4, conv_impl=impl),
                                    jax.random.PRNGKey(0), fov)))
  assert shapes("im2col_kz") == shapes("xla")
  if onednn.available():
    assert shapes("onednn") == shapes("xla")


def test_auto_resolution(monkeypatch):
  monkeypatch.delenv("FFN_JAX_CONV_IMPL", raising=False)
  if jax.default_backend() != "cpu":
    assert conv_lib.resolve("auto") == "xla"
    return
  assert conv_lib.resolve("auto") == ("onednn" if onednn.available() else "im2col_kz")
  monkeypatch.setenv("FFN_JAX_CONV_IMPL", "im2col_kz")
  assert conv_lib.resolve("auto") == "im2col_kz"
  assert conv_lib.resolve("xla") == "xla"  # explicit choices are not overridden
  with pytest.raises(ValueError, match="unknown conv_impl"):
    conv_lib.resolve("nope")


def test_compute_dtype_selects_the_route(monkeypatch):
  """compute_dtype maps each route to its bf16 twin; float32 keeps the route; auto follows the
  hardware and AUTO_PICKS_BF16; a bf16 route with float32 and unknown dtypes are refused."""
  monkeypatch.delenv("FFN_JAX_CONV_IMPL", raising=False)
  assert conv_lib.select("xla", "float32")[:2] == ("xla", "float32")
  assert conv_lib.select("xla", "bfloat16")[:2] == ("xla_bf16", "bfloat16")
  assert conv_lib.select("im2col_kz", "bfloat16")[:2] == ("xla_bf16", "bfloat16")
  if onednn.available():
    runs = conv_lib.onednn_bf16()[0]  # what this CPU does: each answer is checked below
    assert conv_lib.select("onednn", "bfloat16")[:2] == (
        "onednn_bf16" if runs else "xla_bf16", "bfloat16")
    if runs:
      assert conv_lib.select("onednn_bf16", "auto")[:2] == ("onednn_bf16", "bfloat16")
      with pytest.raises(ValueError, match="computes in bfloat16"):
        conv_lib.select("onednn_bf16", "float32")
  with pytest.raises(ValueError, match="unknown compute_dtype"):
    conv_lib.select("auto", "fp16")
  for picks in (False, True):
    monkeypatch.setattr(conv_lib, "AUTO_PICKS_BF16", picks)
    for native in (False, True):
      monkeypatch.setattr(conv_lib, "native_bf16", lambda n=native: (n, "simulated"))
      route, dtype, why = conv_lib.select("auto", "auto")
      assert dtype == ("bfloat16" if picks and native and conv_lib.resolve("auto") != "im2col_kz"
                       else "float32"), (picks, native, why)
      assert route == conv_lib.select("auto", dtype)[0] and "simulated" in why


@ONEDNN_SKIP
@pytest.mark.parametrize("support", ["none", "emulated", "native"])
def test_bf16_routes_follow_what_onednn_builds(monkeypatch, support):
  """oneDNN's answer (simulated: an AVX2-only CPU, plain AVX-512, AVX512-BF16) decides the bf16
  route: bfloat16 always runs somewhere, auto takes it only where native, and an explicit
  onednn_bf16 that cannot run is refused with the reason."""
  monkeypatch.delenv("FFN_JAX_CONV_IMPL", raising=False)
  monkeypatch.setattr(onednn, "bf16_support", lambda: {
      "none": (False, False, "simulated: no primitive"),
      "emulated": (True, False, "jit_bf16:avx512_core"),
      "native": (True, True, "brgconv:avx512_core_bf16")}[support])
  route, dtype, why = conv_lib.select("auto", "bfloat16")
  assert (route, dtype) == ("xla_bf16" if support == "none" else "onednn_bf16", "bfloat16")
  assert ("simulated: no primitive" in why) == (support == "none")
  native, why = conv_lib.native_bf16()
  assert native == (support == "native") and why
  assert conv_lib.select("auto", "auto")[:2] == (
      ("onednn_bf16", "bfloat16") if support == "native" else ("onednn", "float32"))
  if support == "none":
    with pytest.raises(ValueError, match="'onednn_bf16' cannot run: .*simulated: no primitive"):
      conv_lib.select("onednn_bf16", "auto")
    with pytest.raises(ValueError, match="cannot run"):
      conv_lib.conv3d(*_inputs((1, 3, 3, 3, 2), (3, 3, 3), 2)[:3], impl="onednn_bf16")
  else:
    assert conv_lib.select("onednn_bf16", "auto")[0] == "onednn_bf16"


def test_no_bf16_route_is_one_clear_error(monkeypatch):
  monkeypatch.delenv("FFN_JAX_CONV_IMPL", raising=False)
  monkeypatch.setattr(onednn, "bf16_support", lambda: (False, False, "simulated: no primitive"))
  monkeypatch.setattr(conv_lib, "_xla_bf16_error", lambda backend: "simulated: XLA refused")
  with pytest.raises(ValueError, match="no bfloat16 conv route runs here.*XLA refused.*float32"):
    conv_lib.select("auto", "bfloat16")
  assert conv_lib.select("auto", "float32")[1] == "float32"


def test_bf16_probe_asks_onednn():
  """The real probe on this CPU: where oneDNN builds a bf16 conv, the route computes one."""
  runs, native, detail = onednn.bf16_support()
  assert detail
  if not onednn.available():
    assert not runs
    return
  # oneDNN's native bf16 kernels name a bf16 ISA; without one, it is not native.
  assert native == any(u in detail for u in ("bf16", "amx", "avx2_vnni_2", "avx10")) or not runs
  if runs:
    x, w, b, _, _ = _inputs((1, 4, 4, 4, 2), (3, 3, 3), 2)
    _close(conv_lib.conv3d(x, w, b, impl="onednn_bf16"), _reference(x, w, b), 3e-2)


def test_falls_back_to_pure_jax_when_extension_unavailable(monkeypatch):
  monkeypatch.delenv("FFN_JAX_CONV_IMPL", raising=False)
  monkeypatch.setattr(onednn, "_state", {"error": "BuildError: simulated: no g++"})
  if jax.default_backend() == "cpu":
    assert conv_lib.resolve("auto") == "im2col_kz"
  with pytest.raises(ValueError, match="simulated: no g"):
    conv_lib.resolve("onednn")
  # The model still runs, on the fallback route.
  params, image, seed = _small_ffn_case()
  out = model_lib.FFN(depth=3, features=8).apply({"params": params}, image, seed)
  assert out.shape == seed.shape


def test_missing_onednn_gives_clear_error(monkeypatch, tmp_path):
  monkeypatch.setenv("FFN_JAX_ONEDNN_ROOT", str(tmp_path))
  with pytest.raises(build.BuildError, match="FFN_JAX_ONEDNN_ROOT"):
    build.find_onednn()


@ONEDNN_SKIP
def test_build_is_cached(monkeypatch):
  """A second build_library() reuses the cached library: g++ does not run again."""
  first = build.build_library()
  assert first.exists() and first.parent == build.cache_dir()
  real_run, commands = build.subprocess.run, []
  monkeypatch.setattr(build.subprocess, "run",
                      lambda cmd, *a, **k: commands.append(cmd) or real_run(cmd, *a, **k))
  assert build.build_library() == first
  assert commands and not [c for c in commands if "-shared" in c]  # only `g++ --version`
  assert onednn.version().startswith("3.")
