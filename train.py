"""Train an FFN: ``python train.py [--config configs/NAME.py] --workdir DIR [--config.KEY=VALUE]``.

Under ``mpirun -n R`` / ``srun`` the same command trains one model synchronously on R ranks.
"""
import os
import sys

from ffn_jax import cli


def main(argv):
  with cli.clean_errors():
    config, workdir = cli.parse(
        argv, os.path.join(cli.REPO_ROOT, "configs", "synthetic.py"), "train.py")
    from ffn_jax.training import loop  # after flags: keeps --help and flag errors fast
    return loop.main(config, workdir)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
