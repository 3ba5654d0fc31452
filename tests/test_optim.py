import math

import ml_collections
import numpy as np
import pytest

from configs import synthetic
from ffn_jax import optim
from ffn_jax.errors import UserError


def _cfg(**kw) -> ml_collections.ConfigDict:
  c = synthetic.get_config().optim
  c.update(kw)
  return c


@pytest.mark.parametrize("rule,expected", [("none", 0.1), ("linear", 0.8), ("sqrt", 0.1 * math.sqrt(8))])
def test_lr_scaling_rules(rule, expected):
  sched = optim.make_schedule(_cfg(learning_rate=0.1, reference_batch=4, lr_scaling=rule), 32)
  assert float(sched(0)) == pytest.approx(expected)


def test_linear_warmup_then_cosine():
  cfg = _cfg(learning_rate=0.1, reference_batch=4, lr_scaling="linear", warmup_steps=10,
             warmup_init_fraction=0.0, schedule="cosine", decay_steps=100)
  sched = optim.make_schedule(cfg, 8)  # peak 0.2
  assert float(sched(0)) == pytest.approx(0.0)
  assert float(sched(5)) == pytest.approx(0.1)
  assert float(sched(10)) == pytest.approx(0.2)
  assert float(sched(60)) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 0.5)))
  assert float(sched(110)) == pytest.approx(0.0, abs=1e-9)


def test_step_and_exponential_schedules():
  step = optim.make_schedule(_cfg(learning_rate=1.0, schedule="step", step_boundaries=(10, 20),
                                  decay_rate=0.1), 4)
  assert [float(step(s)) for s in (0, 10, 20)] == pytest.approx([1.0, 0.1, 0.01])
  expo = optim.make_schedule(_cfg(learning_rate=1.0, schedule="exponential", decay_steps=10,
                                  decay_rate=0.5), 4)
  assert float(expo(10)) == pytest.approx(0.5)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_builds_and_steps(name):
  extra = {"factory": "configs.optimizers:centralized_adam"} if name == "custom" else {}
  tx, _ = optim.make_optimizer(_cfg(name=name, **extra), 4)
  params = {"w": np.ones(3, np.float32)}
  state = tx.init(params)
  updates, _ = tx.update({"w": np.full(3, 5.0, np.float32)}, state, params)
  assert np.all(np.isfinite(updates["w"])) and np.all(np.asarray(updates["w"]) < 0)


def test_elementwise_clipping_at_0_7():
  tx, _ = optim.make_optimizer(_cfg(name="sgd", learning_rate=1.0, clip_value=0.7), 4)
  updates, _ = tx.update({"w": np.array([5.0, -0.2], np.float32)}, tx.init({"w": np.zeros(2)}))
  np.testing.assert_allclose(updates["w"], [-0.7, 0.2], rtol=1e-6)


def test_global_norm_clipping_scales_the_whole_gradient():
  """clip_global_norm=1: a gradient of global norm 5 (3, 4 over two leaves) is scaled to norm 1,
  keeping its direction; one already below the bound passes unchanged. After elementwise
  clipping when both are set."""
  tx, _ = optim.make_optimizer(_cfg(name="sgd", learning_rate=1.0, clip_value=0.0,
                                    clip_global_norm=1.0), 4)
  params = {"a": np.zeros(1, np.float32), "b": np.zeros(1, np.float32)}
  updates, _ = tx.update({"a": np.array([3.0], np.float32), "b": np.array([4.0], np.float32)},
                         tx.init(params))
  np.testing.assert_allclose([updates["a"][0], updates["b"][0]], [-0.6, -0.8], rtol=1e-6)
  small, _ = tx.update({"a": np.array([0.3], np.float32), "b": np.array([0.4], np.float32)},
                       tx.init(params))
  np.testing.assert_allclose([small["a"][0], small["b"][0]], [-0.3, -0.4], rtol=1e-6)
  both, _ = optim.make_optimizer(_cfg(name="sgd", learning_rate=1.0, clip_value=0.7,
                                      clip_global_norm=0.5), 4)
  updates, _ = both.update({"a": np.array([3.0], np.float32), "b": np.array([4.0], np.float32)},
                           both.init(params))  # (0.7, 0.7) first, then to norm 0.5
  np.testing.assert_allclose([updates["a"][0], updates["b"][0]], [-0.5 / 2**0.5] * 2, rtol=1e-5)


def test_unknown_names_are_clear_errors():
  with pytest.raises(UserError, match="optim.name"):
    optim.make_optimizer(_cfg(name="adagrad"), 4)
  with pytest.raises(UserError, match="lr_scaling"):
    optim.make_schedule(_cfg(lr_scaling="cubic"), 4)


def test_custom_optimizer_from_python_and_from_a_factory_get_the_schedule():
  import optax
  seen = []

  def factory(schedule):
    seen.append(float(schedule(0)))
    return optax.sgd(schedule)

  cfg = _cfg(name="adam", learning_rate=0.5, clip_value=0.0)
  tx, _ = optim.make_optimizer(cfg, 4, custom=factory)  # overrides optim.name
  updates, _ = tx.update({"w": np.ones(2, np.float32)}, tx.init({"w": np.zeros(2)}))
  np.testing.assert_allclose(updates["w"], [-0.5, -0.5])
  assert seen == [0.5]
  tx, _ = optim.make_optimizer(cfg, 4, custom=optax.sgd(0.25))  # or a transformation
  updates, _ = tx.update({"w": np.ones(2, np.float32)}, tx.init({"w": np.zeros(2)}))
  np.testing.assert_allclose(updates["w"], [-0.25, -0.25])


@pytest.mark.parametrize("factory,match", [
    ("", "needs optim.factory"), ("no_colon", "module:function"),
    ("no_such_module_xyz:f", "cannot import"), ("configs.optimizers:nope", "no function"),
    ("configs.synthetic:get_config", "cannot be called with the learning-rate schedule"),
    ("builtins:repr", "not an optax GradientTransformation")])
def test_bad_optimizer_factories_are_clear_errors(factory, match):
  with pytest.raises(UserError, match=match):
    optim.make_optimizer(_cfg(name="custom", factory=factory), 4)


def test_factory_without_custom_name_is_refused():
  with pytest.raises(UserError, match="optim.name=custom only"):
    optim.make_optimizer(_cfg(name="adam", factory="configs.optimizers:lion"), 4)
