"""LevelDB-format tables (SSTables), the ``.index`` file of a tensor bundle.

A 48-byte footer points at the index block, whose entries point at data blocks; blocks hold
prefix-compressed keys with restart points and end in a 5-byte trailer (compression type, masked
crc32c).
"""
from __future__ import annotations

from ffn_jax.tf_bundle import snappy
from ffn_jax.tf_bundle.crc import crc32c, unmask
from ffn_jax.tf_bundle.wire import FormatError, varint

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48
_BLOCK_TRAILER_LEN = 5


def _read_block(data: bytes, handle: bytes, verify_crc: bool) -> bytes:
  offset, pos = varint(handle, 0, "block handle")
  size, _ = varint(handle, pos, "block handle")
  end = offset + size
  if end + _BLOCK_TRAILER_LEN > len(data) - _FOOTER_LEN:
    raise FormatError(f"block at {offset} (+{size} bytes) extends past the end of the table")
  compression = data[end]
  if verify_crc:
    stored = int.from_bytes(data[end + 1:end + 5], "little")
    if unmask(stored) != crc32c(data[offset:end + 1]):
      raise FormatError(f"crc32c mismatch in table block at offset {offset}")
  contents = data[offset:end]
  if compression == 0:
    return contents
  if compression == 1:
    return snappy.decompress(contents)
  raise FormatError(f"unknown block compression type {compression}")


def _block_entries(block: bytes):
  """Yields (key, value) of one table block (keys are prefix-compressed against the previous)."""
  if len(block) < 4:
    raise FormatError("table block too short")
  num_restarts = int.from_bytes(block[-4:], "little")
  limit = len(block) - 4 - 4 * num_restarts
  if limit < 0:
    raise FormatError("bad restart count in table block")
  pos, key = 0, b""
  while pos < limit:
    shared, pos = varint(block, pos, "block entry")
    non_shared, pos = varint(block, pos, "block entry")
    value_len, pos = varint(block, pos, "block entry")
    if shared > len(key) or pos + non_shared + value_len > limit:
      raise FormatError("corrupt entry in table block")
    key = key[:shared] + block[pos:pos + non_shared]
    pos += non_shared
    yield key, block[pos:pos + value_len]
    pos += value_len


def read_table(path: str, verify_crc: bool = True) -> dict[bytes, bytes]:
  """All key/value pairs of a LevelDB-format table file."""
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < _FOOTER_LEN:
    raise FormatError(f"file of {len(data)} bytes is too short for a table")
  footer = data[-_FOOTER_LEN:]
  if int.from_bytes(footer[-8:], "little") != _TABLE_MAGIC:
    raise FormatError("bad table magic number (not a checkpoint .index file, or truncated)")
  _, pos = varint(footer, 0, "footer")  # metaindex offset
  _, pos = varint(footer, pos, "footer")  # metaindex size; the metaindex is unused by TF
  index = _read_block(data, footer[pos:], verify_crc)
  table = {}
  for _, handle in _block_entries(index):
    for key, value in _block_entries(_read_block(data, handle, verify_crc)):
      table[bytes(key)] = bytes(value)
  return table
