"""A PNG of a few z slices: the image in grey with the segmentation overlaid in random colours."""
from __future__ import annotations

import numpy as np


def _colours(max_id: int) -> np.ndarray:
  """RGB per segment ID (row 0 unused); fixed seed so reruns look the same."""
  rng = np.random.default_rng(0)
  return rng.uniform(0.15, 1.0, size=(max_id + 1, 3))


def write_preview(path: str, image_ZYX: np.ndarray, seg_ZYX: np.ndarray, n_slices: int = 3,
                  alpha: float = 0.45, title: str = "") -> None:
  """Writes ``n_slices`` evenly spaced z slices side by side to ``path``."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # local: heavy import, only when a preview is written

  nz = image_ZYX.shape[0]
  zs = sorted({int(round((i + 1) * nz / (n_slices + 1))) for i in range(n_slices)})
  zs = [min(max(z, 0), nz - 1) for z in zs]
  colours = _colours(int(seg_ZYX.max()) if seg_ZYX.size else 0)
  fig, axes = plt.subplots(1, len(zs), figsize=(4 * len(zs), 4.3), squeeze=False)
  lo, hi = np.percentile(image_ZYX, (1, 99)) if image_ZYX.size else (0, 1)
  for ax, z in zip(axes[0], zs):
    grey = np.clip((image_ZYX[z].astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    ids = seg_ZYX[z]
    on = ids > 0
    rgb[on] = (1 - alpha) * rgb[on] + alpha * colours[ids[on]]
    ax.imshow(rgb, interpolation="nearest")
    ax.set_title(f"z = {z}  ({len(np.unique(ids[on]))} segments)", fontsize=9)
    ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
