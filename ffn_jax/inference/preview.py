"""PNGs of a few z slices: the image in grey with a segmentation overlaid in random colours
(``write_preview``, infer.py's ``preview.png``), or image, truth and segmentation side by side
(``write_comparison``, ``python -m ffn_jax.evaluate --preview``)."""
from __future__ import annotations

import numpy as np


def _colours(max_id: int) -> np.ndarray:
  """RGB per segment ID (row 0 unused); fixed seed so reruns look the same."""
  rng = np.random.default_rng(0)
  return rng.uniform(0.15, 1.0, size=(max_id + 1, 3))


def _slices(nz: int, n_slices: int) -> list[int]:
  zs = sorted({int(round((i + 1) * nz / (n_slices + 1))) for i in range(n_slices)})
  return [min(max(z, 0), nz - 1) for z in zs]


def _grey(image_ZYX: np.ndarray):
  lo, hi = np.percentile(image_ZYX, (1, 99)) if image_ZYX.size else (0, 1)
  return lambda sl: np.clip((sl.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)


def write_comparison(path: str, image_ZYX: np.ndarray, truth_ZYX: np.ndarray,
                     seg_ZYX: np.ndarray, n_slices: int = 3, title: str = "") -> None:
  """Rows of z slices: the image, the truth and the segmentation (0 = unlabelled, black), each
  label in its own random colour."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  zs = _slices(image_ZYX.shape[0], n_slices)
  grey = _grey(image_ZYX)
  fig, axes = plt.subplots(len(zs), 3, figsize=(9.6, 3.2 * len(zs)), squeeze=False)
  for row, z in enumerate(zs):
    for col, (name, vol) in enumerate((("image", None), ("truth", truth_ZYX),
                                       ("segmentation", seg_ZYX))):
      ax = axes[row][col]
      if vol is None:
        ax.imshow(grey(image_ZYX[z]), cmap="gray", interpolation="nearest")
      else:
        ids = vol[z].astype(np.int64)
        _, inverse = np.unique(ids, return_inverse=True)
        colours = _colours(int(inverse.max()) if ids.size else 0)
        rgb = colours[inverse.reshape(ids.shape)]
        rgb[ids == 0] = 0.0
        ax.imshow(rgb, interpolation="nearest")
      ax.set_title(f"{name}, z = {z}", fontsize=9)
      ax.axis("off")
  _save(fig, path, title, dpi=80)


def write_preview(path: str, image_ZYX: np.ndarray, seg_ZYX: np.ndarray, n_slices: int = 3,
                  alpha: float = 0.45, title: str = "") -> None:
  """Writes ``n_slices`` evenly spaced z slices side by side to ``path``."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # local: heavy import, only when a preview is written

  zs = _slices(image_ZYX.shape[0], n_slices)
  colours = _colours(int(seg_ZYX.max()) if seg_ZYX.size else 0)
  fig, axes = plt.subplots(1, len(zs), figsize=(4 * len(zs), 4.3), squeeze=False)
  to_grey = _grey(image_ZYX)
  for ax, z in zip(axes[0], zs):
    grey = to_grey(image_ZYX[z])
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    ids = seg_ZYX[z]
    on = ids > 0
    rgb[on] = (1 - alpha) * rgb[on] + alpha * colours[ids[on]]
    ax.imshow(rgb, interpolation="nearest")
    ax.set_title(f"z = {z}  ({len(np.unique(ids[on]))} segments)", fontsize=9)
    ax.axis("off")
  _save(fig, path, title, dpi=100)


def _save(fig, path: str, title: str, dpi: int) -> None:
  import matplotlib.pyplot as plt
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
