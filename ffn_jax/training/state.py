"""Where a training run's state comes from, and what its checkpoints hold.

The state (``TrainState``: step, parameters, optimizer state, rng) starts from a fresh init,
from ``init_checkpoint`` (fine-tuning: its parameters, a fresh optimizer), or from the run's own
checkpoint (resume); checkpoints hold it with every rank's data-pipeline state
(``checkpoint_tree``), and ``meta_checker`` refuses one of another model, optimizer, rank count
or batch before its arrays are read. Also the model built from the config, and the parameter
fingerprint that tests and logs compare across ranks and runs.
"""
from __future__ import annotations

import hashlib

import flax.struct
import jax
import numpy as np

from ffn_jax import checkpoint as ckpt_lib
from ffn_jax import conv as conv_lib
from ffn_jax.errors import UserError
from ffn_jax.model import FFN, init_params


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: object
  rng: jax.Array  # uint32 key data; kept so every run's randomness is restorable
  # The exponential moving average of ``params`` (``optim.ema_decay`` > 0), else None: what
  # the segmentation eval floods with and what infer.py loads.
  ema_params: dict | None = None

  @property
  def eval_params(self) -> dict:
    """The parameters to evaluate and segment with: the average where there is one."""
    return self.params if self.ema_params is None else self.ema_params


def params_fingerprint(params) -> str:
  """SHA-256 hex digest of all parameter bytes, leaves in flattened (sorted-key) tree order."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    arr = np.ascontiguousarray(np.asarray(leaf))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(str(arr.dtype).encode())
    digest.update(str(arr.shape).encode())
    digest.update(arr.tobytes())
  return digest.hexdigest()


# -- the model ---------------------------------------------------------------------------------
def compute_route(config) -> tuple[str, str, str]:
  """(conv route, compute dtype, why) of ``model.conv_impl`` and ``model.compute_dtype``
  (``conv.choose``: a UserError for an unknown or unavailable route or dtype)."""
  return conv_lib.choose(config.model.conv_impl, config.model.get("compute_dtype", "auto"),
                         "model")


def build_model(config) -> FFN:
  return FFN(depth=config.model.depth, features=config.model.features,
             conv_impl=compute_route(config)[0],
             kernel_init=config.model.get("kernel_init", "glorot_uniform"))


def model_meta(config) -> dict:
  """What checkpoints record about the model: geometry (checked on resume and fine-tuning),
  the normalization and the compute dtype (which inference follows by default)."""
  return {"model": {"depth": config.model.depth, "features": config.model.features,
                    "fov_size_zyx": list(config.model.fov_size_zyx),
                    "deltas_zyx": list(config.model.deltas_zyx)},
          "ema_decay": ema_decay(config),
          "image_mean": config.data.image_mean, "image_stddev": config.data.image_stddev,
          "compute_dtype": compute_route(config)[1]}


# -- state ---------------------------------------------------------------------------------------
def _key_data(rng):
  return jax.random.key_data(rng) if hasattr(jax.random, "key_data") else rng


def ema_decay(config) -> float:
  """``optim.ema_decay`` (configs of one's own may lack the field: 0, off)."""
  return float(config.optim.get("ema_decay", 0.0))


def init_state(config, model, tx, dist, params=None) -> TrainState:
  """Step 0: ``params`` (fine-tuning) or a fresh init, rank 0's broadcast to every rank; the
  moving average (if on) starts at them."""
  rng = jax.random.PRNGKey(config.seed)
  if params is None:
    params = init_params(model, rng, config.model.fov_size_zyx)
  params = dist.broadcast_tree(params)
  ema = jax.tree_util.tree_map(np.array, params) if ema_decay(config) > 0 else None
  return TrainState(step=np.int32(0), params=params, opt_state=tx.init(params),
                    rng=np.asarray(_key_data(rng)), ema_params=ema)


def abstract_state(config, model, tx) -> TrainState:
  """Shapes and dtypes of ``init_state``'s result, traced only: a resume (or a refused
  checkpoint) never pays for compiling and running the initialization."""
  def init():
    rng = jax.random.PRNGKey(config.seed)
    params = init_params(model, rng, config.model.fov_size_zyx)
    return TrainState(step=np.int32(0), params=params, opt_state=tx.init(params),
                      rng=_key_data(rng), ema_params=params if ema_decay(config) > 0 else None)
  return jax.eval_shape(init)


def load_init_params(config, model) -> dict:
  """The parameters of ``config.init_checkpoint``, checked against the configured model.

  Raises:
    UserError: the path holds no readable checkpoint, or one of another model geometry.
  """
  path = config.init_checkpoint
  try:
    params, meta = ckpt_lib.load_params(path)
  except ckpt_lib.CheckpointError as e:
    raise UserError(f"init_checkpoint: {e}") from None
  have = meta.get("model")
  if not isinstance(have, dict):
    raise UserError(f"init_checkpoint {path} records no model geometry (depth, features, "
                    "fov_size_zyx, deltas_zyx)")
  diff = geometry_diff(model_meta(config)["model"], have)
  if diff:
    raise UserError(f"init_checkpoint {path} holds another model: {'; '.join(diff)}; set "
                    "config.model.* to match it")
  expected = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0),
                                                config.model.fov_size_zyx))
  try:
    ckpt_lib.check_same_shapes(expected, params)
  except ckpt_lib.CheckpointMismatch as e:
    raise UserError(f"init_checkpoint {path}: {e}") from None
  return params


def checkpoint_tree(state: TrainState, data_states: list[dict]) -> dict:
  return {"train": state, "data": {k: np.stack([s[k] for s in data_states])
                                   for k in data_states[0]}}


def geometry_diff(want: dict, have: dict) -> list[str]:
  """What differs between the configured model geometry and a checkpoint's, one text each."""
  return [f"{k} {have.get(k)} (checkpoint) vs {want[k]} (config)" for k in want
          if have.get(k) != want[k]]


def meta_checker(config, dist, global_batch: int):
  """``check_meta`` for restore_latest: refuses a checkpoint of another model/optimizer/batch."""
  want = model_meta(config)["model"]

  def check(step, meta):
    where = f"checkpoint step {step}"
    fix = "use the config it was trained with, or another --workdir"
    have = meta.get("model")
    if isinstance(have, dict):
      diff = geometry_diff(want, have)
      if diff:
        raise ckpt_lib.CheckpointMismatch(
            f"{where} was trained with a different model: {'; '.join(diff)}; {fix}")
    have_ema = float(meta.get("config", {}).get("optim", {}).get("ema_decay", 0.0) or 0.0)
    if (have_ema > 0) != (ema_decay(config) > 0):
      raise ckpt_lib.CheckpointMismatch(
          f"{where} was trained with optim.ema_decay={have_ema}, this run has "
          f"{ema_decay(config)} (a moving average is kept, or not, from the start); {fix}")
    optim_name = meta.get("config", {}).get("optim", {}).get("name")
    if optim_name is not None and optim_name != config.optim.name:
      raise ckpt_lib.CheckpointMismatch(
          f"{where} was trained with optim.name={optim_name!r}, not {config.optim.name!r}; {fix}")
    if int(meta.get("ranks", dist.size)) != dist.size:
      raise ckpt_lib.CheckpointMismatch(
          f"{where} was written by {meta['ranks']} ranks; rerun with the same rank count "
          f"(now {dist.size}) or start a new --workdir")
    if int(meta.get("global_batch", global_batch)) != global_batch:
      raise ckpt_lib.CheckpointMismatch(
          f"{where} was trained with a global batch of {meta['global_batch']}, this run has "
          f"{global_batch}; {fix}")

  return check
