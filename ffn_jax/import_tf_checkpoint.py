"""Imports Google's pretrained FFN TensorFlow checkpoint as ffn_jax parameters, without TensorFlow.

The checkpoint (a tensor bundle) is read by ``ffn_jax.tf_bundle``. Google's variables
``seed_update/conv{i}_{a,b}/{weights,biases}`` and ``seed_update/conv_lom/...`` become
``params['conv{i}_{a,b}']['kernel'|'bias']``; kernels are [kz, ky, kx, c_in, c_out] in both.

Usage:
  python -m ffn_jax.import_tf_checkpoint /path/model.ckpt-27465036 --out DIR
"""
from __future__ import annotations

import argparse
import os
import re

import numpy as np

from ffn_jax.errors import UserError
from ffn_jax.tf_bundle import BundleReader

_PARAM_RE = re.compile(r"^seed_update/(conv\d+_[ab]|conv_lom)/(weights|biases)$")
_GLOBAL_STEP = "global_step"


# ------------------------------------------------------------------------------- FFN params
def to_flax_params(tensors: dict[str, np.ndarray]) -> tuple[dict, int, int]:
  """Maps Google's ``seed_update/*`` tensors to our FFN parameter tree.

  Returns:
    (params, depth, features); the tree equals ``init_params(FFN(depth, features), ...)`` in
    structure, shapes and dtypes.
  Raises:
    UserError: variables missing or extra, or a shape/dtype that FFN does not have.
  """
  import jax  # local: parsing the bundle needs no jax
  from flax import traverse_util
  from ffn_jax import model as model_lib

  params: dict[str, dict[str, np.ndarray]] = {}
  for name, value in tensors.items():
    m = _PARAM_RE.match(name)
    if m:
      params.setdefault(m.group(1), {})["kernel" if m.group(2) == "weights" else "bias"] = value
  blocks = [int(k[4:-2]) for k in params if k != "conv_lom"]
  if not blocks or "conv0_a" not in params or "kernel" not in params["conv0_a"]:
    raise UserError("checkpoint has no seed_update/conv0_a/weights: not an FFN ConvStack3DFFNModel")
  depth = max(blocks) + 1
  features = int(params["conv0_a"]["kernel"].shape[-1])
  model = model_lib.FFN(depth=depth, features=features)
  expected = jax.eval_shape(
      lambda: model_lib.init_params(model, jax.random.PRNGKey(0), (3, 3, 3)))
  want = traverse_util.flatten_dict(expected, sep="/")
  got = traverse_util.flatten_dict(params, sep="/")
  tf_name = lambda key: ("seed_update/" + key.replace("/kernel", "/weights")
                         .replace("/bias", "/biases"))
  missing = sorted(tf_name(k) for k in want.keys() - got.keys())
  extra = sorted(tf_name(k) for k in got.keys() - want.keys())
  if missing or extra:
    raise UserError(f"checkpoint variables do not form an FFN of depth {depth}: missing {missing}, "
                    f"unexpected {extra}")
  for key, spec in want.items():
    value = got[key]
    if tuple(value.shape) != tuple(spec.shape) or value.dtype != spec.dtype:
      raise UserError(f"{tf_name(key)} is {value.dtype}{list(value.shape)}; FFN(depth={depth}, "
                      f"features={features}) expects {spec.dtype}{list(spec.shape)}")
  return params, depth, features


def import_checkpoint(path: str, fov_size_zyx=(33, 33, 33), deltas_zyx=(8, 8, 8),
                      image_mean: float = 128, image_stddev: float = 33,
                      verify_crc: bool = True) -> tuple[dict, dict]:
  """Reads a TF FFN checkpoint; returns (params, meta) ready for ``checkpoint.save_params``.

  The FOV size, deltas and image normalization are not stored in the checkpoint; the defaults are
  those of Google's FIB-25 model.
  """
  reader = BundleReader(path, verify_crc)
  names = [n for n in reader.entries if _PARAM_RE.match(n)]
  tensors = reader.read_all(names)
  params, depth, features = to_flax_params(tensors)
  global_step = int(reader.read(_GLOBAL_STEP)) if _GLOBAL_STEP in reader.entries else 0
  meta = {
      "model": {"depth": depth, "features": features,
                "fov_size_zyx": [int(v) for v in fov_size_zyx],
                "deltas_zyx": [int(v) for v in deltas_zyx]},
      "image_mean": _plain_number(image_mean),
      "image_stddev": _plain_number(image_stddev),
      "source": os.path.abspath(reader.prefix),
      "global_step": global_step,
  }
  return params, meta


def _plain_number(x: float):
  return int(x) if float(x).is_integer() else float(x)


# ---------------------------------------------------------------------------------------- CLI
def _zyx(text: str) -> tuple[int, int, int]:
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    values = ()
  if len(values) != 3 or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected three positive integers Z,Y,X, got {text!r}")
  return values


class _Parser(argparse.ArgumentParser):
  """Reports bad arguments as a UserError (one line, exit 2) instead of usage + message."""

  def error(self, message):
    raise UserError(f"{message} (see --help)")


def main(argv: list[str] | None = None) -> None:
  parser = _Parser(
      prog="python -m ffn_jax.import_tf_checkpoint",
      description="Convert Google's TensorFlow FFN checkpoint (no TensorFlow needed) into an "
                  "ffn_jax params checkpoint readable with ffn_jax.checkpoint.load_params.")
  parser.add_argument("checkpoint", help="checkpoint prefix, e.g. /path/model.ckpt-27465036 "
                      "(the .index file path is accepted too)")
  parser.add_argument("--out", required=True,
                      help="output directory; must not exist or be empty")
  parser.add_argument("--fov-size-zyx", type=_zyx, default=(33, 33, 33),
                      help="model FOV size recorded in the metadata (default: 33,33,33)")
  parser.add_argument("--deltas-zyx", type=_zyx, default=(8, 8, 8),
                      help="FOV movement deltas recorded in the metadata (default: 8,8,8)")
  parser.add_argument("--image-mean", type=float, default=128, help="default: 128")
  parser.add_argument("--image-stddev", type=float, default=33, help="default: 33")
  parser.add_argument("--no-verify-crc", action="store_true",
                      help="skip the crc32c checks of the index blocks and tensors")
  args = parser.parse_args(argv)

  out = os.path.abspath(args.out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise UserError(f"--out {out} exists and is not an empty directory; choose a new one")
  params, meta = import_checkpoint(
      args.checkpoint, args.fov_size_zyx, args.deltas_zyx, args.image_mean, args.image_stddev,
      verify_crc=not args.no_verify_crc)
  from ffn_jax import checkpoint as checkpoint_lib  # local: orbax is a slow import
  from ffn_jax import model as model_lib
  checkpoint_lib.save_params(out, params, step=meta["global_step"], meta=meta)
  print(f"wrote {out}: FFN depth {meta['model']['depth']}, "
        f"{model_lib.count_params(params):,} parameters, global_step {meta['global_step']}")


if __name__ == "__main__":
  from ffn_jax.cli import clean_errors
  with clean_errors():
    main()
