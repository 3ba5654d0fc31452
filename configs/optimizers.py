"""Example optimizer factories for ``--config.optim.name=custom --config.optim.factory=...``.

A factory is any function of the learning-rate schedule (``optim.learning_rate`` with
``optim.lr_scaling`` and ``optim.warmup_steps``/``optim.schedule`` applied) that returns an optax
``GradientTransformation``. The config's clipping (``optim.clip_value``,
``optim.clip_global_norm``) is chained in front of it; under MPI it sees the allreduced gradient.

  python train.py --config configs/gala.py --workdir runs/lion \\
      --config.optim.name=custom --config.optim.factory=configs.optimizers:lion \\
      --config.optim.learning_rate=1e-4
"""
import optax


def lion(learning_rate: optax.Schedule) -> optax.GradientTransformation:
  """Lion (Chen et al. 2023): sign of an interpolated momentum; use ~3-10x smaller LRs than Adam."""
  return optax.lion(learning_rate, b1=0.9, b2=0.99)


def centralized_adam(learning_rate: optax.Schedule) -> optax.GradientTransformation:
  """Gradient centralization (each conv kernel's gradient minus its mean) chained with Adam."""
  return optax.chain(optax.centralize(), optax.scale_by_adam(),
                     optax.scale_by_learning_rate(learning_rate))
