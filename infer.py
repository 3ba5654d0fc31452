"""Segment a volume with a trained FFN.

``python infer.py --config configs/NAME.py --workdir OUT [--config.KEY=VALUE ...]`` writes
``OUT/segmentation.zarr``, ``OUT/counters.json`` and ``OUT/preview.png``; rerunning the same
command after a kill resumes from ``OUT/inference_state.npz``.
"""
import os
import sys

from ffn_jax import cli


def main(argv):
  with cli.clean_errors():
    config, workdir = cli.parse(
        argv, os.path.join(cli.REPO_ROOT, "configs", "fib25_infer.py"), "infer.py")
    from ffn_jax.inference import runner  # after flags: keeps --help and flag errors fast
    runner.run(config, workdir)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
