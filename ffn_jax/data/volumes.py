"""Volumes read lazily by box through tensorstore or h5py; always zyx.

A volume spec is one of:
- a tensorstore JSON spec (dict, or a string starting with ``{``);
- a path to a ``.zarr`` (v2 or v3, detected), ``.n5`` or neuroglancer precomputed folder;
- ``path.h5:dataset`` (also ``.hdf5``, ``.hdf``);
- a numpy array (tests, synthetic data).
Multi-channel arrays are not supported: volumes are 3-D [z, y, x].

A volume's user attributes (zarr ``.zattrs``, zarr v3 ``attributes``, n5 ``attributes.json``) are
``Volume.attrs``; ``infer.py`` records there where its segmentation sits in the source volume
(``offset_zyx``) so that evaluation can crop the truth to match.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ffn_jax.errors import UserError

_H5_SUFFIXES = (".h5", ".hdf5", ".hdf")


def normalize(raw: np.ndarray, mean: float, stddev: float) -> np.ndarray:
  """The FFN's input: ``(raw - mean) / stddev`` in float32. The one normalization of training
  volumes, the training eval's box and inference canvases alike."""
  return (np.asarray(raw).astype(np.float32) - np.float32(mean)) / np.float32(stddev)


class Volume:
  """A 3-D array read by box. ``read(start_zyx, size_zyx)`` returns a numpy array."""

  def __init__(self, shape, dtype, reader, name: str, attrs: dict | None = None):
    self.shape = tuple(int(s) for s in shape)
    self.dtype = np.dtype(dtype)
    self._reader = reader
    self.name = name
    self.attrs = dict(attrs or {})

  def offset_zyx(self) -> tuple[int, int, int] | None:
    """Where this volume's voxel (0, 0, 0) sits in its source volume, if recorded."""
    value = self.attrs.get("offset_zyx")
    if value is None:
      return None
    try:
      offset = tuple(int(v) for v in value)
    except (TypeError, ValueError):
      offset = ()
    if len(offset) != 3:
      raise UserError(f"volume {self.name} records offset_zyx {value!r}; expected three integers")
    return offset

  def read(self, start_zyx=(0, 0, 0), size_zyx=None) -> np.ndarray:
    start = np.asarray(start_zyx, int)
    size = np.asarray(self.shape if size_zyx is None else size_zyx, int)
    stop = start + size
    box = f"box start {tuple(start.tolist())} size {tuple(size.tolist())} (zyx)"
    if np.any(start < 0) or np.any(stop > self.shape):
      raise UserError(f"{box} lies outside volume {self.name} of shape {self.shape}")
    try:
      return np.asarray(self._reader(tuple(slice(a, b) for a, b in zip(start, stop))))
    except MemoryError:
      raise
    except Exception as e:  # noqa: BLE001 - tensorstore/h5py raise many types for bad data
      text = " ".join(str(e).split())[:300] or type(e).__name__
      raise UserError(f"cannot read {box} of volume {self.name}: {text}") from None


def _abs_kvstore(spec: dict) -> dict:
  """tensorstore refuses relative file paths containing '..': absolutize them."""
  spec = json.loads(json.dumps(spec))
  kv = spec.get("kvstore")
  if isinstance(kv, dict) and kv.get("driver") == "file" and "path" in kv:
    kv["path"] = os.path.abspath(kv["path"])
  elif isinstance(kv, str) and kv.startswith("file://"):
    spec["kvstore"] = "file://" + os.path.abspath(kv[len("file://"):])
  return spec


def _spec_for_path(path: str) -> dict:
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise UserError(f"volume not found: {path}")
  if os.path.exists(os.path.join(path, "zarr.json")):
    driver = "zarr3"
  elif os.path.exists(os.path.join(path, ".zarray")):
    driver = "zarr"
  elif os.path.exists(os.path.join(path, "attributes.json")):
    driver = "n5"
  elif os.path.exists(os.path.join(path, "info")):
    driver = "neuroglancer_precomputed"
  else:
    raise UserError(f"cannot tell the format of {path}: expected a zarr, zarr3, n5 or "
                    "neuroglancer_precomputed folder, a 'file.h5:dataset', or a tensorstore spec")
  return {"driver": driver, "kvstore": {"driver": "file", "path": path}}


def _read_attrs(path: str) -> dict:
  """User attributes stored beside a zarr (v2 or v3) or n5 array folder; {} if none."""
  for name, key in ((".zattrs", None), ("zarr.json", "attributes"), ("attributes.json", None),
                    ("provenance", None)):
    file = os.path.join(path, name)
    if os.path.exists(file):
      try:
        with open(file) as f:
          attrs = json.load(f)
      except (OSError, ValueError) as e:
        raise UserError(f"cannot read the attributes {file}: {e}") from None
      attrs = attrs.get(key, {}) if key else attrs
      return attrs if isinstance(attrs, dict) else {}
  return {}


def _open_h5(path: str, dataset: str) -> Volume:
  import h5py  # local: only needed for HDF5 volumes
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise UserError(f"volume not found: {path}")
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise UserError(f"cannot open HDF5 file {path}: {e}") from None
  if dataset not in f:
    raise UserError(f"dataset {dataset!r} not found in {path} (has: {sorted(f.keys())})")
  ds = f[dataset]
  if ds.ndim != 3:
    raise UserError(f"{path}:{dataset} has {ds.ndim} dimensions; volumes must be 3-D zyx")
  return Volume(ds.shape, ds.dtype, lambda sl: ds[sl], f"{path}:{dataset}", dict(ds.attrs))


def open_volume(spec: Any) -> Volume:
  """Opens a volume for reading; see the module docstring for accepted specs.

  Raises:
    UserError: the path does not exist, the format is unknown, or the array is not 3-D.
  """
  if isinstance(spec, Volume):
    return spec
  if isinstance(spec, np.ndarray):
    if spec.ndim != 3:
      raise UserError(f"volume array has {spec.ndim} dimensions; volumes must be 3-D zyx")
    return Volume(spec.shape, spec.dtype, lambda sl: spec[sl], "<array>")
  if hasattr(spec, "to_dict"):  # ml_collections ConfigDict
    spec = spec.to_dict()
  if isinstance(spec, str):
    text = spec.strip()
    if not text:
      raise UserError("empty volume spec")
    if text.startswith("{"):
      try:
        spec = json.loads(text)
      except json.JSONDecodeError as e:
        raise UserError(f"volume spec is not valid JSON: {e}") from None
    else:
      lower = text.lower()
      for suffix in _H5_SUFFIXES:
        marker = suffix + ":"
        if marker in lower:
          cut = lower.index(marker) + len(suffix)
          return _open_h5(text[:cut], text[cut + 1:])
        if lower.endswith(suffix):
          raise UserError(f"HDF5 volume {text!r} needs a dataset: use 'file{suffix}:dataset'")
      spec = _spec_for_path(text)
  if not isinstance(spec, dict):
    raise UserError(f"unsupported volume spec of type {type(spec).__name__}")
  import tensorstore as ts  # local: heavy import
  spec = _abs_kvstore(spec)
  kv = spec.get("kvstore")
  if isinstance(kv, dict) and kv.get("driver") == "file" and not os.path.exists(kv["path"]):
    raise UserError(f"volume not found: {kv['path']}")
  try:
    store = ts.open(spec, read=True).result()
  except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/other for bad specs
    raise UserError(f"cannot open volume {json.dumps(spec)}: {' '.join(str(e).split())[:300]}") \
        from None
  name = spec.get("kvstore", {}).get("path", json.dumps(spec)) if isinstance(
      spec.get("kvstore"), dict) else json.dumps(spec)
  attrs = _read_attrs(name) if os.path.isdir(name) else {}
  if store.ndim == 4 and store.domain.labels[-1] == "channel" and store.shape[-1] == 1:
    # neuroglancer precomputed: x, y, z, channel, starting at its voxel_offset.
    store = store[..., 0].T
    attrs.setdefault("offset_zyx", [int(v) for v in store.domain.inclusive_min])
    store = store[ts.d[:].translate_to[0]]
  if store.ndim != 3:
    raise UserError(f"volume {json.dumps(spec)} has {store.ndim} dimensions; volumes must be 3-D")
  return Volume(store.shape, store.dtype.numpy_dtype,
                lambda sl: store[sl].read().result(), name, attrs)


def _zarr_spec(path: str, shape, chunks, dtype) -> dict:
  """tensorstore spec of a zarr v2 array (blosc/zstd) at ``path``, chunks clipped to the shape."""
  shape = [int(s) for s in shape]
  return {"driver": "zarr", "kvstore": {"driver": "file", "path": path},
          "metadata": {"shape": shape, "chunks": [min(int(c), s) for c, s in zip(chunks, shape)],
                       "dtype": np.dtype(dtype).str,
                       "compressor": {"id": "blosc", "cname": "zstd", "clevel": 3,
                                      "shuffle": 2}}}


def _write_attrs(path: str, attrs: dict) -> None:
  """``attrs`` as a JSON file at ``path``, replaced atomically."""
  with open(path + ".tmp", "w") as f:
    json.dump(attrs, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(path + ".tmp", path)


def write_zarr(path: str, array: np.ndarray, chunks=(64, 64, 64),
               attrs: dict | None = None) -> None:
  """Writes a zyx array as zarr v2 (blosc/zstd) with tensorstore, replacing ``path``.

  ``attrs`` (JSON-serializable) go to the array's ``.zattrs``, as zarr readers expect them.
  """
  import tensorstore as ts
  path = os.path.abspath(path)
  store = ts.open(_zarr_spec(path, array.shape, chunks, array.dtype), create=True,
                  delete_existing=True).result()
  store.write(array).result()
  if attrs:
    _write_attrs(os.path.join(path, ".zattrs"), attrs)


OUTPUT_FORMATS = ("zarr", "precomputed")


class SegmentationWriter:
  """A new segmentation volume written block by block (zyx, volume-relative coordinates).

  ``zarr``: zarr v2 whose ``.zattrs`` hold ``attrs`` (with ``offset_zyx``). ``precomputed``:
  neuroglancer precomputed segmentation (compressed_segmentation, ``voxel_offset`` = the
  offset, ``resolution`` = the voxel size in x, y, z) that neuroglancer opens directly, with
  ``attrs`` in a ``provenance`` file beside its ``info``. Both are written into ``path + '.tmp'``
  and moved to ``path`` by ``finish()``, so a killed job leaves no partial output at ``path``.
  """

  def __init__(self, path: str, fmt: str, shape_zyx, offset_zyx, voxel_size_zyx, dtype,
               attrs: dict, chunks=(64, 64, 64)):
    import shutil

    import tensorstore as ts
    if fmt not in OUTPUT_FORMATS:
      raise UserError(f"output_format must be one of {OUTPUT_FORMATS}, got {fmt!r}")
    self.path, self.fmt, self.attrs = os.path.abspath(path), fmt, dict(attrs)
    self.tmp = self.path + ".tmp"
    if os.path.exists(self.tmp):
      shutil.rmtree(self.tmp)
    shape = [int(v) for v in shape_zyx]
    chunks = [min(int(c), s) for c, s in zip(chunks, shape)]
    dtype = np.dtype(dtype)
    if fmt == "zarr":
      self._view = ts.open(_zarr_spec(self.tmp, shape, chunks, dtype), create=True).result()
    else:
      store = ts.open({
          "driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": self.tmp},
          "multiscale_metadata": {"type": "segmentation", "data_type": dtype.name,
                                  "num_channels": 1},
          "scale_metadata": {"size": shape[::-1], "voxel_offset": [int(v) for v in
                                                                   offset_zyx][::-1],
                             "resolution": [float(v) for v in voxel_size_zyx][::-1],
                             "encoding": "compressed_segmentation",
                             "compressed_segmentation_block_size": [8, 8, 8],
                             "chunk_size": chunks[::-1]},
      }, create=True).result()
      self._view = store[..., 0].T[ts.d[:].translate_to[0]]

  def write(self, start_zyx, block: np.ndarray) -> None:
    sl = tuple(slice(int(a), int(a) + n) for a, n in zip(start_zyx, block.shape))
    self._view[sl].write(block).result()

  def finish(self) -> None:
    name = ".zattrs" if self.fmt == "zarr" else "provenance"
    _write_attrs(os.path.join(self.tmp, name), self.attrs)
    os.replace(self.tmp, self.path)
