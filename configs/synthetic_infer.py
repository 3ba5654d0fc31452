"""Inference on the synthetic volume of configs/synthetic.py: a seconds-long smoke run.

Pair it with a checkpoint from ``python train.py --workdir W`` (``--config.checkpoint=W``).
``image = ''`` generates the volume from ``synthetic``; set ``image`` to segment a real one.
"""
import ml_collections

from configs import fib25_infer


def get_config() -> ml_collections.ConfigDict:
  c = fib25_infer.get_config()
  c.image = ""
  c.image_mean = -1.0    # from the checkpoint
  c.image_stddev = -1.0
  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.shape_zyx = (48, 80, 80)
  c.synthetic.objects = 16
  c.synthetic.seed = 1  # not the training volume's seed (0)
  c.inference.min_segment_size = 100
  # Mirror the volume by half a FOV: without it no FOV is centred in the outer 8 voxels, 57 % of
  # this 48x80x80 volume, which then stays unlabelled.
  c.border_padding = "reflect"
  c.batch_size = 4
  c.checkpoint_interval_s = 30.0
  c.progress_interval_s = 5.0
  return c
