"""CRC-32C (Castagnoli), as LevelDB tables and TensorFlow tensor bundles use it, and its mask."""
from __future__ import annotations

import functools
import math

import numpy as np

_CRC_MASK_DELTA = 0xA282EAD8


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


def unmask(masked: int) -> int:
  rot = (masked - _CRC_MASK_DELTA) & 0xFFFFFFFF
  return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF
