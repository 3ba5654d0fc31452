"""The synthetic config shrunk to seconds: for tests and smoke checks (like big_vision's runlocal)."""
from configs import synthetic


def get_config():
  c = synthetic.get_config()
  c.model.depth = 2
  c.model.features = 8
  c.model.fov_size_zyx = (9, 9, 9)
  c.model.deltas_zyx = (2, 2, 2)
  c.data.synthetic_shape_zyx = (24, 40, 40)
  c.data.synthetic_objects = 10
  c.data.lom_radius_zyx = (3, 3, 3)
  c.data.min_size = 50
  c.batch_size = 2
  c.max_steps = 20
  c.log_every = 5
  c.checkpoint_every = 10
  c.sync_check_every = 5
  return c
