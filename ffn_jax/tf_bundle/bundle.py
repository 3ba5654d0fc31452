"""TensorFlow tensor bundles (``PREFIX.index`` + ``PREFIX.data-SSSSS-of-NNNNN``) read with numpy.

The index is a LevelDB table (``sstable``) whose keys are variable names and values serialized
``BundleEntryProto`` (dtype, shape, shard_id, offset, size, crc32c); the empty key holds the
``BundleHeaderProto`` (num_shards, endianness). The data shards hold the raw tensor bytes.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

import numpy as np

from ffn_jax.errors import UserError
from ffn_jax.tf_bundle.crc import crc32c, unmask
from ffn_jax.tf_bundle.sstable import read_table
from ffn_jax.tf_bundle.wire import FormatError, int64, proto_fields

# TensorFlow DataType enum -> numpy dtype (little-endian; byte order fixed up from the header).
_TF_DTYPES = {
    1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
    9: np.int64, 10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64,
}
_TF_DTYPE_NAMES = {7: "string", 8: "complex64", 14: "bfloat16", 18: "complex128",
                   20: "resource", 21: "variant"}


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
  fields = proto_fields(value, what)
  if 7 in fields:
    raise FormatError(f"variable {name!r} is partitioned into slices; not supported")
  shape = []
  if 2 in fields:
    shape_fields = proto_fields(fields[2][-1], what)
    if shape_fields.get(3, [0])[-1]:
      raise FormatError(f"variable {name!r} has unknown rank")
    for dim in shape_fields.get(2, []):
      shape.append(int64(proto_fields(dim, what).get(1, [0])[-1]))
  if any(d < 0 for d in shape):
    raise FormatError(f"variable {name!r} has an unknown dimension in shape {shape}")
  first = lambda k: fields.get(k, [0])[-1]
  return BundleEntry(name=name, tf_dtype=first(1), shape=tuple(shape), shard_id=first(3),
                     offset=int64(first(4)), size=int64(first(5)),
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
        raise FormatError("no bundle header (empty key) in the index")
      header = proto_fields(table.pop(b""), "bundle header")
      self.entries = {k.decode("utf-8", "replace"): _parse_entry(k.decode("utf-8", "replace"), v)
                      for k, v in table.items()}
    except FormatError as e:
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
    if self.verify_crc and e.crc32c is not None and crc32c(raw) != unmask(e.crc32c):
      raise UserError(f"checkpoint data file {path} is corrupt: crc32c mismatch for {name!r}")
    dtype = e.dtype.newbyteorder(">" if self.big_endian else "<")
    return np.frombuffer(raw, dtype).reshape(e.shape).astype(e.dtype.newbyteorder("="))

  def read_all(self, names=None) -> dict[str, np.ndarray]:
    return {n: self.read(n) for n in (sorted(self.entries) if names is None else names)}
