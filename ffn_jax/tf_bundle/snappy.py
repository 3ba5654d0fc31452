"""Raw snappy block decompression (LevelDB's optional block compression)."""
from __future__ import annotations

from ffn_jax.tf_bundle.wire import FormatError, varint


def decompress(buf: bytes) -> bytes:
  """Raw snappy block format (varint length, then literal / copy elements)."""
  expected, pos = varint(buf, 0, "snappy block")
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
        raise FormatError("truncated snappy literal")
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
      raise FormatError("truncated snappy copy")
    offset = high | int.from_bytes(buf[pos:pos + width], "little")
    pos += width
    if offset == 0 or offset > len(out):
      raise FormatError("bad snappy copy offset")
    start = len(out) - offset
    for i in range(length):  # byte by byte: copies may overlap their own output
      out.append(out[start + i])
  if len(out) != expected:
    raise FormatError(f"snappy block decodes to {len(out)} bytes, header says {expected}")
  return bytes(out)
