"""Protocol-buffer wire format, decoded by hand: varints and messages as {field: [values]}."""
from __future__ import annotations


class FormatError(Exception):
  """The bytes do not follow the tensor-bundle / SSTable / protobuf format."""


def varint(buf: bytes, pos: int, what: str) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= len(buf):
      raise FormatError(f"truncated varint in {what}")
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if not b & 0x80:
      return result, pos
    shift += 7
    if shift > 63:
      raise FormatError(f"overlong varint in {what}")


def proto_fields(buf: bytes, what: str) -> dict[int, list]:
  """Decodes one protobuf message into {field number: [values]} (ints or bytes)."""
  fields: dict[int, list] = {}
  pos = 0
  while pos < len(buf):
    tag, pos = varint(buf, pos, what)
    number, wire_type = tag >> 3, tag & 7
    if wire_type == 0:
      value, pos = varint(buf, pos, what)
    elif wire_type in (1, 5):
      width = 8 if wire_type == 1 else 4
      if pos + width > len(buf):
        raise FormatError(f"truncated fixed-width field in {what}")
      value = int.from_bytes(buf[pos:pos + width], "little")
      pos += width
    elif wire_type == 2:
      length, pos = varint(buf, pos, what)
      if pos + length > len(buf):
        raise FormatError(f"truncated length-delimited field in {what}")
      value = bytes(buf[pos:pos + length])
      pos += length
    else:
      raise FormatError(f"unsupported protobuf wire type {wire_type} in {what}")
    fields.setdefault(number, []).append(value)
  return fields


def int64(value: int) -> int:
  return value - (1 << 64) if value >= 1 << 63 else value
