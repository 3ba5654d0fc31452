import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffn_jax import conv
from ffn_jax.model import FFN, count_params, init_params, logit


def test_fib25_parameter_count_and_names():
  params = init_params(FFN(depth=12, features=32), jax.random.PRNGKey(0), (33, 33, 33))
  assert count_params(params) == 638_433
  assert set(params) == {"conv0_a", "conv0_b", "conv_lom",
                         *(f"conv{i}_{ab}" for i in range(1, 12) for ab in "ab")}
  assert params["conv0_a"]["kernel"].shape == (3, 3, 3, 2, 32)
  assert params["conv_lom"]["kernel"].shape == (1, 1, 1, 32, 1)


@pytest.mark.parametrize("impl", ["xla", "im2col_kz"])
def test_output_shape_and_additive_seed_update(impl):
  model = FFN(depth=2, features=4, conv_impl=impl)
  params = init_params(model, jax.random.PRNGKey(1), (7, 9, 11))
  image = jax.random.normal(jax.random.PRNGKey(2), (3, 7, 9, 11, 1))
  seed = jnp.full((3, 7, 9, 11, 1), logit(0.05)).at[:, 3, 4, 5, 0].set(logit(0.95))
  out = model.apply({"params": params}, image, seed)
  assert out.shape == (3, 7, 9, 11, 1)
  # With the final 1x1x1 conv zeroed the update is zero: the output is exactly the input seed.
  zeroed = jax.tree_util.tree_map(lambda x: x, params)
  zeroed["conv_lom"] = jax.tree_util.tree_map(jnp.zeros_like, params["conv_lom"])
  np.testing.assert_array_equal(model.apply({"params": zeroed}, image, seed), seed)
  # A bias on the final conv shifts every voxel by that bias.
  zeroed["conv_lom"]["bias"] = jnp.array([0.5])
  np.testing.assert_allclose(model.apply({"params": zeroed}, image, seed), seed + 0.5, rtol=1e-6)


def test_conv_routes_agree_with_xla():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 7, 8, 5))
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 5, 4))
  b = jax.random.normal(jax.random.PRNGKey(2), (4,))
  ref = conv.conv3d(x, k, b, impl="xla")
  for impl in conv.available_routes():
    np.testing.assert_allclose(conv.conv3d(x, k, b, impl=impl), ref, atol=1e-4, rtol=1e-4)


def test_unknown_conv_route_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown conv_impl"):
    conv.resolve("nope")
