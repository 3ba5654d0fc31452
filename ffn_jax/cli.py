"""Shared command-line plumbing for train.py / infer.py: config files, overrides, clean errors.

``--config path.py`` loads ``get_config()`` (an ml_collections ConfigDict, locked against typos),
``--config.key=value`` overrides fields, ``--workdir DIR`` is where outputs go. Bad input becomes
one line on stderr and exit code 2; ``FFN_JAX_TRACEBACK=1`` shows the traceback instead.
"""
from __future__ import annotations

import contextlib
import os
import sys

from absl import flags
from ml_collections import config_flags

from ffn_jax.errors import UserError

EXIT_USER_ERROR = 2

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv: list[str], default_config: str, prog: str):
  """Parses ``--config``, its overrides and ``--workdir``; returns (config, workdir).

  Raises:
    UserError: unknown flag or config key, wrong value type, missing config file or workdir.
  """
  if REPO_ROOT not in sys.path:  # config files import each other as ``configs.NAME``
    sys.path.insert(0, REPO_ROOT)
  fv = flags.FlagValues()
  # sys_argv: the override flags to define are read from argv (by default from sys.argv, which
  # is wrong when parse() is called in-process, e.g. by the benchmarks).
  config_flags.DEFINE_config_file(
      "config", default=default_config, help_string="Python config file with get_config().",
      lock_config=True, flag_values=fv, sys_argv=list(argv))
  flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics, results).",
                      flag_values=fv)
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(f"usage: {prog} [--config configs/NAME.py] --workdir DIR [--config.KEY=VALUE ...]")
    print(fv.main_module_help() if hasattr(fv, "main_module_help") else "")
    sys.exit(0)
  try:
    fv(argv)
  except flags.Error as e:
    raise UserError(_flag_error(e)) from None
  except (AttributeError, KeyError) as e:
    # A locked ConfigDict raises AttributeError(KeyError("'key'\nDid you mean ...")).
    key_error = e if isinstance(e, KeyError) else e.args[0] if e.args else None
    if isinstance(key_error, KeyError):
      raise UserError(f"unknown config key: {_key_error(key_error)}") from None
    raise UserError(f"bad config override: {_one_line(e)}") from None
  except (TypeError, ValueError) as e:
    raise UserError(f"bad config override: {_one_line(e)}") from None
  if not fv.workdir:
    raise UserError("--workdir is required")
  try:
    config = fv.config
  except Exception as e:  # noqa: BLE001 - config files are user code; report their failure
    raise UserError(f"cannot load config: {_one_line(e)}") from None
  return config, fv.workdir


def overridden_keys(argv: list[str]) -> tuple[str, ...]:
  """The config keys the command line sets (``--config.a.b=v`` or ``--config.a.b v``): 'a.b'."""
  return tuple(a[len("--config."):].split("=", 1)[0] for a in argv
               if a.startswith("--config."))


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return text[:500] if text else type(e).__name__


def _key_error(e: KeyError) -> str:
  text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
  key, _, hint = text.partition("\n")
  hint = " ".join(hint.split())
  return f"{key} ({hint})" if hint else key


def _flag_error(e: flags.Error) -> str:
  text = _one_line(e)
  if "Could not find" in text or "Unknown" in text or "not found" in text.lower():
    return f"unknown flag or config key: {text}"
  return f"bad flag value: {text}"


@contextlib.contextmanager
def clean_errors():
  """Turns UserError (and a few obvious user mistakes) into one line + exit 2."""
  try:
    yield
  except UserError as e:
    if os.environ.get("FFN_JAX_TRACEBACK"):
      raise
    fail(f"error: {e}", EXIT_USER_ERROR)


def fail(message: str, code: int) -> None:
  """Prints one line and exits; under MPI, names the rank and ends every rank."""
  from ffn_jax import parallel  # local: keeps the import of cli light
  world = parallel.mpi_world()
  if world is not None and world[1] > 1:
    message = f"[rank {world[0]}] {message}"
  print(message, file=sys.stderr, flush=True)
  parallel.abort_job(code)
