"""The pure training step: gradients of the soft-label loss, then the optax update.

Split in two so that ``ffn_jax.parallel`` can average gradients over local devices and MPI ranks
in between; ``train_step`` composes both for one device.
"""
from __future__ import annotations

import jax
import optax

from ffn_jax import losses
from ffn_jax.training.state import TrainState


def grads_and_stats(params, batch, *, model):
  """Returns (grads, stats, logits_BZYX1) for one batch; stats hold loss and confusion counts."""
  def loss_fn(p):
    logits_BZYX1 = model.apply({"params": p}, batch["image"], batch["seed"])
    return losses.sigmoid_xent(logits_BZYX1, batch["labels"]), logits_BZYX1

  (loss, logits_BZYX1), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  stats = {"loss": loss, **losses.confusion_counts(logits_BZYX1, batch["labels"])}
  return grads, stats, logits_BZYX1


def apply_update(state: TrainState, grads, *, tx: optax.GradientTransformation) -> TrainState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state)


def train_step(state: TrainState, batch, *, model, tx):
  """One device: (state, batch) -> (state, stats, logits)."""
  grads, stats, logits_BZYX1 = grads_and_stats(state.params, batch, model=model)
  return apply_update(state, grads, tx=tx), stats, logits_BZYX1
