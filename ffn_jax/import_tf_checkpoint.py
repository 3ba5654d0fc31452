"""Imports Google's pretrained FFN TensorFlow checkpoint as ffn_jax parameters, without TensorFlow.

A TensorFlow checkpoint ``PREFIX`` is a tensor bundle:

- ``PREFIX.index`` is a LevelDB-format table (SSTable): a 48-byte footer points at the index block,
  whose entries point at data blocks; blocks hold prefix-compressed keys with restart points and end
  in a 5-byte trailer (compression type, masked crc32c). Keys are variable names, values serialized
  ``BundleEntryProto`` (dtype, shape, shard_id, offset, size, crc32c); the empty key holds the
  ``BundleHeaderProto`` (num_shards, endianness).
- ``PREFIX.data-SSSSS-of-NNNNN`` shards hold the raw tensor bytes.

Both formats and the protobuf wire format are decoded here by hand. Google's variables
``seed_update/conv{i}_{a,b}/{weights,biases}`` and ``seed_update/conv_lom/...`` become
``params['conv{i}_{a,b}']['kernel'|'bias']``; kernels are [kz, ky, kx, c_in, c_out] in both.

Usage:
  python -m ffn_jax.import_tf_checkpoint /path/model.ckpt-27465036 --out DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re

import numpy as np

from ffn_jax.errors import UserError

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48
_BLOCK_TRAILER_LEN = 5
_CRC_MASK_DELTA = 0xA282EAD8

# TensorFlow DataType enum -> numpy dtype (little-endian; byte order fixed up from the header).
_TF_DTYPES = {
    1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
    9: np.int64, 10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64,
}
_TF_DTYPE_NAMES = {7: "string", 8: "complex64", 14: "bfloat16", 18: "complex128",
                   20: "resource", 21: "variant"}

_PARAM_RE = re.compile(r"^seed_update/(conv\d+_[ab]|conv_lom)/(weights|biases)$")
_GLOBAL_STEP = "global_step"


class _FormatError(Exception):
  """The bytes do not follow the tensor-bundle / SSTable / protobuf format."""


# ----------------------------------------------------------------------------------- crc32c
def _crc_table() -> np.ndarray:
  table = np.zeros(256, np.uint32)
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    table[i] = c
  return table


_CRC_TABLE = _crc_table()
_CRC_TABLE_LIST = _CRC_TABLE.tolist()


@functools.lru_cache(maxsize=64)
def _zeros_operator(n_bytes: int) -> list[list[int]]:
  """Tables op[k][b] = raw CRC state after feeding ``n_bytes`` zeros to the state ``b << 8k``."""
  state = (np.arange(256, dtype=np.uint32)[None, :]
           << (8 * np.arange(4, dtype=np.uint32))[:, None]).astype(np.uint32)
  for _ in range(n_bytes):
    state = _CRC_TABLE[state & 0xFF] ^ (state >> 8)
  return state.tolist()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of ``data``.

  Long inputs are cut into ~sqrt(n) chunks whose CRC states are computed in parallel with numpy and
  then chained (the CRC register is linear over GF(2)), so a 100 kB tensor takes milliseconds.
  """
  table = _CRC_TABLE_LIST
  crc = 0xFFFFFFFF
  n = len(data)
  chunk = max(256, math.isqrt(n))
  n_chunks = n // chunk
  head = n - n_chunks * chunk
  for b in data[:head]:
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  if n_chunks:
    body_CL = np.frombuffer(data, np.uint8, offset=head).reshape(n_chunks, chunk)
    body_LC = np.ascontiguousarray(body_CL.T)
    state_C = np.zeros(n_chunks, np.uint32)
    state_C[0] = crc
    for column in body_LC:
      state_C = _CRC_TABLE[(state_C ^ column) & 0xFF] ^ (state_C >> 8)
    op = _zeros_operator(chunk)
    crc = 0
    for s in state_C.tolist():
      crc = (op[0][crc & 0xFF] ^ op[1][(crc >> 8) & 0xFF] ^ op[2][(crc >> 16) & 0xFF]
             ^ op[3][crc >> 24] ^ s)
  return crc ^ 0xFFFFFFFF


def _unmask_crc(masked: int) -> int:
  rot = (masked - _CRC_MASK_DELTA) & 0xFFFFFFFF
  return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ------------------------------------------------------------------------- wire primitives
def _varint(buf: bytes, pos: int, what: str) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= len(buf):
      raise _FormatError(f"truncated varint in {what}")
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if not b & 0x80:
      return result, pos
    shift += 7
    if shift > 63:
      raise _FormatError(f"overlong varint in {what}")


def _proto_fields(buf: bytes, what: str) -> dict[int, list]:
  """Decodes one protobuf message into {field number: [values]} (ints or bytes)."""
  fields: dict[int, list] = {}
  pos = 0
  while pos < len(buf):
    tag, pos = _varint(buf, pos, what)
    number, wire_type = tag >> 3, tag & 7
    if wire_type == 0:
      value, pos = _varint(buf, pos, what)
    elif wire_type in (1, 5):
      width = 8 if wire_type == 1 else 4
      if pos + width > len(buf):
        raise _FormatError(f"truncated fixed-width field in {what}")
      value = int.from_bytes(buf[pos:pos + width], "little")
      pos += width
    elif wire_type == 2:
      length, pos = _varint(buf, pos, what)
      if pos + length > len(buf):
        raise _FormatError(f"truncated length-delimited field in {what}")
      value = bytes(buf[pos:pos + length])
      pos += length
    else:
      raise _FormatError(f"unsupported protobuf wire type {wire_type} in {what}")
    fields.setdefault(number, []).append(value)
  return fields


def _int64(value: int) -> int:
  return value - (1 << 64) if value >= 1 << 63 else value


# ----------------------------------------------------------------------------------- snappy
def _snappy_decompress(buf: bytes) -> bytes:
  """Raw snappy block format (varint length, then literal / copy elements)."""
  expected, pos = _varint(buf, 0, "snappy block")
  out = bytearray()
  while pos < len(buf):
    tag = buf[pos]
    pos += 1
    kind = tag & 3
    if kind == 0:
      length = tag >> 2
      if length >= 60:
        extra = length - 59
        length = int.from_bytes(buf[pos:pos + extra], "little")
        pos += extra
      length += 1
      if pos + length > len(buf):
        raise _FormatError("truncated snappy literal")
      out += buf[pos:pos + length]
      pos += length
      continue
    if kind == 1:
      length = ((tag >> 2) & 7) + 4
      width, high = 1, (tag >> 5) << 8
    else:
      length = (tag >> 2) + 1
      width, high = (2 if kind == 2 else 4), 0
    if pos + width > len(buf):
      raise _FormatError("truncated snappy copy")
    offset = high | int.from_bytes(buf[pos:pos + width], "little")
    pos += width
    if offset == 0 or offset > len(out):
      raise _FormatError("bad snappy copy offset")
    start = len(out) - offset
    for i in range(length):  # byte by byte: copies may overlap their own output
      out.append(out[start + i])
  if len(out) != expected:
    raise _FormatError(f"snappy block decodes to {len(out)} bytes, header says {expected}")
  return bytes(out)


# ---------------------------------------------------------------------------------- SSTable
def _read_block(data: bytes, handle: bytes, verify_crc: bool) -> bytes:
  offset, pos = _varint(handle, 0, "block handle")
  size, _ = _varint(handle, pos, "block handle")
  end = offset + size
  if end + _BLOCK_TRAILER_LEN > len(data) - _FOOTER_LEN:
    raise _FormatError(f"block at {offset} (+{size} bytes) extends past the end of the table")
  compression = data[end]
  if verify_crc:
    stored = int.from_bytes(data[end + 1:end + 5], "little")
    if _unmask_crc(stored) != crc32c(data[offset:end + 1]):
      raise _FormatError(f"crc32c mismatch in table block at offset {offset}")
  contents = data[offset:end]
  if compression == 0:
    return contents
  if compression == 1:
    return _snappy_decompress(contents)
  raise _FormatError(f"unknown block compression type {compression}")


def _block_entries(block: bytes):
  """Yields (key, value) of one table block (keys are prefix-compressed against the previous)."""
  if len(block) < 4:
    raise _FormatError("table block too short")
  num_restarts = int.from_bytes(block[-4:], "little")
  limit = len(block) - 4 - 4 * num_restarts
  if limit < 0:
    raise _FormatError("bad restart count in table block")
  pos, key = 0, b""
  while pos < limit:
    shared, pos = _varint(block, pos, "block entry")
    non_shared, pos = _varint(block, pos, "block entry")
    value_len, pos = _varint(block, pos, "block entry")
    if shared > len(key) or pos + non_shared + value_len > limit:
      raise _FormatError("corrupt entry in table block")
    key = key[:shared] + block[pos:pos + non_shared]
    pos += non_shared
    yield key, block[pos:pos + value_len]
    pos += value_len


def read_table(path: str, verify_crc: bool = True) -> dict[bytes, bytes]:
  """All key/value pairs of a LevelDB-format table file."""
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < _FOOTER_LEN:
    raise _FormatError(f"file of {len(data)} bytes is too short for a table")
  footer = data[-_FOOTER_LEN:]
  if int.from_bytes(footer[-8:], "little") != _TABLE_MAGIC:
    raise _FormatError("bad table magic number (not a checkpoint .index file, or truncated)")
  _, pos = _varint(footer, 0, "footer")  # metaindex offset
  _, pos = _varint(footer, pos, "footer")  # metaindex size; the metaindex is unused by TF
  index = _read_block(data, footer[pos:], verify_crc)
  table = {}
  for _, handle in _block_entries(index):
    for key, value in _block_entries(_read_block(data, handle, verify_crc)):
      table[bytes(key)] = bytes(value)
  return table


# ---------------------------------------------------------------------------- tensor bundle
@dataclasses.dataclass(frozen=True)
class BundleEntry:
  """Where one tensor lies in the data shards."""
  name: str
  tf_dtype: int
  shape: tuple[int, ...]
  shard_id: int
  offset: int
  size: int
  crc32c: int | None  # masked, as stored

  @property
  def dtype(self) -> np.dtype | None:
    """numpy dtype, or None for TensorFlow types this reader does not support."""
    t = _TF_DTYPES.get(self.tf_dtype)
    return None if t is None else np.dtype(t)

  @property
  def dtype_name(self) -> str:
    d = self.dtype
    if d is not None:
      return d.name
    return _TF_DTYPE_NAMES.get(self.tf_dtype, f"DataType {self.tf_dtype}")


def _parse_entry(name: str, value: bytes) -> BundleEntry:
  what = f"entry {name!r}"
  fields = _proto_fields(value, what)
  if 7 in fields:
    raise _FormatError(f"variable {name!r} is partitioned into slices; not supported")
  shape = []
  if 2 in fields:
    shape_fields = _proto_fields(fields[2][-1], what)
    if shape_fields.get(3, [0])[-1]:
      raise _FormatError(f"variable {name!r} has unknown rank")
    for dim in shape_fields.get(2, []):
      shape.append(_int64(_proto_fields(dim, what).get(1, [0])[-1]))
  if any(d < 0 for d in shape):
    raise _FormatError(f"variable {name!r} has an unknown dimension in shape {shape}")
  first = lambda k: fields.get(k, [0])[-1]
  return BundleEntry(name=name, tf_dtype=first(1), shape=tuple(shape), shard_id=first(3),
                     offset=_int64(first(4)), size=_int64(first(5)),
                     crc32c=fields[6][-1] if 6 in fields else None)


def _prefix_of(path: str) -> str:
  path = os.fspath(path)
  if path.endswith(".index"):
    return path[:-len(".index")]
  m = re.match(r"^(.*)\.data-\d{5}-of-\d{5}$", path)
  return m.group(1) if m else path


class BundleReader:
  """Reads a TensorFlow tensor bundle (``PREFIX.index`` + ``PREFIX.data-*``) with numpy only.

  Raises:
    UserError: files missing, truncated, corrupt or not a tensor bundle.
  """

  def __init__(self, path: str, verify_crc: bool = True):
    self.prefix = _prefix_of(path)
    self.verify_crc = verify_crc
    index_path = self.prefix + ".index"
    if not os.path.isfile(index_path):
      raise UserError(f"TensorFlow checkpoint not found: {index_path} does not exist "
                      "(pass the checkpoint prefix, e.g. /path/model.ckpt-27465036)")
    try:
      table = read_table(index_path, verify_crc)
      if b"" not in table:
        raise _FormatError("no bundle header (empty key) in the index")
      header = _proto_fields(table.pop(b""), "bundle header")
      self.entries = {k.decode("utf-8", "replace"): _parse_entry(k.decode("utf-8", "replace"), v)
                      for k, v in table.items()}
    except _FormatError as e:
      raise UserError(f"cannot read TensorFlow checkpoint index {index_path}: {e}") from None
    self.num_shards = header.get(1, [1])[-1]
    self.big_endian = header.get(2, [0])[-1] == 1
    for e in self.entries.values():
      if not 0 <= e.shard_id < self.num_shards:
        raise UserError(f"checkpoint {index_path}: variable {e.name!r} names shard {e.shard_id} "
                        f"of {self.num_shards}")

  def shard_path(self, shard_id: int) -> str:
    return f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}"

  def variables(self) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype name)} as ``tf.train.list_variables`` would list them."""
    return {name: (e.shape, e.dtype_name) for name, e in sorted(self.entries.items())}

  def read(self, name: str) -> np.ndarray:
    if name not in self.entries:
      raise UserError(f"variable {name!r} is not in checkpoint {self.prefix}")
    e = self.entries[name]
    if e.dtype is None:
      raise UserError(f"variable {name!r} has TensorFlow type {e.dtype_name}, which this importer "
                      "does not read (numeric types only)")
    expected = math.prod(e.shape) * e.dtype.itemsize
    if e.size != expected:
      raise UserError(f"checkpoint {self.prefix}: variable {name!r} of shape {e.shape} "
                      f"{e.dtype_name} should take {expected} bytes, index says {e.size}")
    path = self.shard_path(e.shard_id)
    if not os.path.isfile(path):
      raise UserError(f"checkpoint data file not found: {path}")
    with open(path, "rb") as f:
      f.seek(e.offset)
      raw = f.read(e.size)
    if len(raw) != e.size:
      raise UserError(f"checkpoint data file {path} is truncated: variable {name!r} needs bytes "
                      f"{e.offset}..{e.offset + e.size}, file has {os.path.getsize(path)}")
    if self.verify_crc and e.crc32c is not None and crc32c(raw) != _unmask_crc(e.crc32c):
      raise UserError(f"checkpoint data file {path} is corrupt: crc32c mismatch for {name!r}")
    dtype = e.dtype.newbyteorder(">" if self.big_endian else "<")
    return np.frombuffer(raw, dtype).reshape(e.shape).astype(e.dtype.newbyteorder("="))

  def read_all(self, names=None) -> dict[str, np.ndarray]:
    return {n: self.read(n) for n in (sorted(self.entries) if names is None else names)}


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
