"""Segment a volume with a trained FFN.

``python infer.py --config configs/NAME.py --workdir OUT [--config.KEY=VALUE ...]`` writes
``OUT/segmentation.zarr``, ``OUT/counters.json`` and ``OUT/preview.png``; rerunning the same
command after a kill resumes from ``OUT/inference_state.npz``. With ``--config.tile_size_zyx``
the bbox (by default the whole volume) is segmented in overlapping tiles, spread over the ranks
of ``mpirun -n R python infer.py ...``, and stitched (``ffn_jax/inference/tiled.py``).
"""
import os
import sys

from ffn_jax import cli


def main(argv):
  with cli.clean_errors():
    config, workdir = cli.parse(
        argv, os.path.join(cli.REPO_ROOT, "configs", "fib25_infer.py"), "infer.py")
    from ffn_jax.inference import runner, tiled  # after flags: keeps --help and errors fast
    explicit = cli.overridden_keys(argv)
    if tiled.enabled(config):
      tiled.run(config, workdir, explicit=explicit)
    else:
      runner.run(config, workdir, explicit=explicit)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
