"""Inference building blocks: movement, seeds, thresholds, and the canvas (with a stub FFN).

The stub is a perfect flood filler that reads object IDs hidden in the image: it marks the
object under the FOV's confident seed voxels (logit 4) and gives the next object a weak logit
(0.8: above the segment threshold, below the move threshold), so segments overlap.
"""
import os

import numpy as np
import pytest
from scipy import ndimage

from ffn_jax.inference import canvas as canvas_lib
from ffn_jax.inference import options as options_lib
from ffn_jax.inference import movement, seed, tiling

FOV = (9, 9, 9)
DELTAS = (3, 3, 3)


# ----------------------------------------------------------------------------------- helpers
def voronoi_labels(shape=(34, 34, 34), n=7, rng_seed=0):
  rng = np.random.default_rng(rng_seed)
  points = rng.uniform(0, np.array(shape) - 1, size=(n, 3))
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
  d = ((grid[..., None, :] - points) ** 2).sum(-1)
  return (np.argmin(d, -1) + 1).astype(np.int32)


_RADIUS = np.sqrt(sum(g ** 2 for g in np.meshgrid(
    *[np.arange(n) - n // 2 for n in FOV], indexing="ij"))).astype(np.float32)


def stub_predict(calls=None, fail_after=None):
  """Oracle FFN on images whose value is 10 * object ID; counts FOVs in ``calls``."""

  def predict(image_BZYX, seed_BZYX):
    out = np.empty_like(seed_BZYX)
    for b in range(image_BZYX.shape[0]):
      if calls is not None:
        calls.append(1)
        if fail_after is not None and len(calls) > fail_after:
          raise KeyboardInterrupt("simulated kill")
      img, s = image_BZYX[b], seed_BZYX[b]
      sure = s > 2.0
      if not sure.any():
        out[b] = s
        continue
      vals, counts = np.unique(img[sure], return_counts=True)
      obj = vals[np.argmax(counts)]
      # Confidence falls off from the FOV centre, so face maxima are unique (no corner ties).
      out[b] = np.where(img == obj, 4.0 - 0.05 * _RADIUS, np.where(img == obj + 10, 0.8, -4.0))
    return out

  return predict


def make_canvas(labels, batch_size=1, predict=None, **opts):
  image = (labels * 10).astype(np.float32)
  options = options_lib.InferenceOptions(**{"min_segment_size": 50, **opts})
  c = canvas_lib.Canvas(image, predict or stub_predict(), batch_size, FOV, DELTAS, options)
  c.set_seeds(seed.policy_grid(image.shape, step=6, offsets=(4, 7)))
  return c


# ----------------------------------------------------------------------------------- thresholds
def test_thresholds_are_float32_logits():
  th = options_lib.Thresholds(options_lib.InferenceOptions())
  for got, p in ((th.init, 0.95), (th.pad, 0.05), (th.move, 0.9), (th.segment, 0.6)):
    assert got.dtype == np.float32
    assert got == pytest.approx(np.log(p / (1 - p)), abs=1e-6)
  # Google rounds the probability to float32 (proto field) before the logit: 2.1972244, not
  # float32(logit(0.9)) = 2.1972246.
  assert th.move == np.float32(2.1972244)
  with pytest.raises(ValueError):
    options_lib.Thresholds(options_lib.InferenceOptions(move_threshold=1.0))


def test_segment_threshold_applied_in_logit_space():
  # Object 1's neighbour gets logit 0.8 (p = 0.69): part of the segment at p 0.6, not at p 0.7.
  labels = voronoi_labels()
  low = make_canvas(labels, segment_threshold=0.6)
  low.segment_all()
  high = make_canvas(labels, segment_threshold=0.7)
  high.segment_all()
  assert low.counters["voxels_overlapping"] > 0
  assert high.counters.get("voxels_overlapping", 0) == 0


# ----------------------------------------------------------------------------------- movement
def test_face_max_moves_thresholds_and_order():
  logits = np.full((9, 9, 9), -5.0, np.float32)
  logits[7, 4, 5] = 3.0    # +z face (centre 4 + delta 3), offset (0, +1) -> (3, 0, 1)
  logits[4, 1, 2] = 2.0    # -y face: below threshold 2.5
  logits[2, 4, 7] = 3.0    # +x face, same score: ties sort by offset, descending
  moves = movement.face_max_moves(logits, (3, 3, 3), threshold=2.5)
  assert moves == [(3.0, (3, 0, 1)), (3.0, (-2, 0, 3))]
  # A voxel on the edge shared by two faces is one move.
  logits = np.full((9, 9, 9), -5.0, np.float32)
  logits[7, 7, 4] = 4.0
  assert movement.face_max_moves(logits, (3, 3, 3), threshold=0.0) == [(4.0, (3, 3, 0))]
  # A zero delta axis is never moved along.
  assert all(rel[0] == 0 for _, rel in movement.face_max_moves(
      np.random.default_rng(0).normal(size=(9, 9, 9)), (0, 3, 3), threshold=-10))


def test_policy_fifo_visited_and_validity():
  pol = movement.FaceMaxPolicy((3, 3, 3), score_threshold=2.0)
  pol.reset((10, 10, 10))
  assert pol.pop(lambda p: True) == (10, 10, 10)
  logits = np.full((9, 9, 9), -5.0, np.float32)
  logits[4, 4, 7] = 3.0   # +x
  logits[4, 4, 1] = 2.5   # -x, lower score -> queued second
  pol.update(logits, (10, 10, 10))
  assert [c for _, c in pol.queue] == [(10, 10, 13), (10, 10, 7)]
  # An invalid position is skipped; the next one is returned.
  assert pol.pop(lambda p: p != (10, 10, 13)) == (10, 10, 7)
  # Positions in an already visited lattice cell are skipped without asking the canvas.
  pol.queue.append((3.0, (10, 11, 9)))  # cell (0, 0, 0) = the start, visited
  pol.queue.append((3.0, (10, 10, 16)))
  asked = []
  assert pol.pop(lambda p: asked.append(p) or True) == (10, 10, 16)
  assert asked == [(10, 10, 16)]
  assert pol.pop(lambda p: True) is None
  # State round trip.
  pol.queue.append((2.5, (1, 2, 3)))
  other = movement.FaceMaxPolicy((3, 3, 3), 2.0)
  other.set_state(pol.get_state())
  assert list(other.queue) == list(pol.queue) and other.visited == pol.visited


# ----------------------------------------------------------------------------------- seeds
def test_peak_local_max_matches_brute_force():
  rng = np.random.default_rng(1)
  image = ndimage.gaussian_filter(rng.normal(size=(14, 15, 16)), 1.0)
  got = seed.peak_local_max(image, min_distance=2, threshold_abs=0)
  want = []
  for p in np.ndindex(image.shape):
    if any(v < 2 or v >= s - 2 for v, s in zip(p, image.shape)) or image[p] <= 0:
      continue
    win = image[tuple(slice(v - 2, v + 3) for v in p)]
    if image[p] == win.max():
      want.append(p)
  assert sorted(map(tuple, got)) == sorted(want)
  values = image[tuple(got.T)]
  assert np.all(np.diff(values) <= 0)  # brightest first


def test_policy_peaks_on_edge_volume():
  # Two balls of radius 9 with bright walls: seeds at the centres, ascending zyx order.
  shape = (40, 40, 64)
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
  image = np.full(shape, 100.0, np.float32)
  centres = [(20, 20, 16), (20, 20, 46)]
  for c in centres:
    r = np.sqrt(((grid - c) ** 2).sum(-1))
    image[(r > 9) & (r < 11)] = 250.0
  coords = seed.policy_peaks(image)
  assert coords.dtype == np.int64 and coords.shape[1] == 3
  for c in centres:
    assert np.min(np.abs(coords - c).max(1)) <= 1, (c, coords)
  assert [tuple(c) for c in coords] == sorted(tuple(c) for c in coords)
  assert np.all(coords >= 3) and np.all(coords < np.array(shape) - 3)
  # Anisotropy: the EDT is measured in voxel_size units.
  dt_iso = seed.edge_distance(image)
  dt_z2 = seed.edge_distance(image, voxel_size_zyx=(2, 1, 1))
  assert np.all(dt_z2 >= dt_iso) and np.any(dt_z2 > dt_iso + 1)
  # Deterministic, and independent of numpy's global random state.
  np.random.seed(123)
  assert np.array_equal(seed.policy_peaks(image), coords)


def test_policy_grid_order_and_border_filter():
  coords = seed.policy_grid((32, 32, 32), step=16, offsets=(0, 8))
  assert len(coords) == 16
  assert [tuple(c) for c in coords[:3]] == [(0, 0, 0), (0, 0, 16), (0, 16, 0)]
  assert tuple(coords[8]) == (8, 8, 8)
  seeds = seed.SeedList(coords, (32, 32, 32), margin_zyx=(4, 4, 4))
  got = []
  while (n := seeds.next()) is not None:
    got.append(n[1])
  assert got == [(16, 16, 16), (8, 8, 8), (8, 8, 24), (8, 24, 8), (8, 24, 24), (24, 8, 8), (24, 8, 24),
                 (24, 24, 8), (24, 24, 24)]


def test_keyed_policies_depend_only_on_volume_position():
  """With origin_zyx the noise and the grid are functions of the volume position: any block
  sees the same values / lattice points as a larger block holding it."""
  whole = seed.keyed_noise((0, 0, 0), (20, 21, 22))
  assert whole.dtype == np.float64 and 0 <= whole.min() and whole.max() < 1
  assert abs(whole.mean() - 0.5) < 0.01 and len(np.unique(whole)) == whole.size
  np.testing.assert_array_equal(seed.keyed_noise((3, 4, 5), (10, 10, 10)), whole[3:13, 4:14, 5:15])
  np.testing.assert_array_equal(seed.keyed_noise((-2, 0, 0), (4, 4, 4))[2:], whole[:2, :4, :4])
  assert not np.array_equal(seed.keyed_noise((1, 0, 0), (4, 4, 4)), whole[:4, :4, :4])
  # The grid: the volume's lattice, whatever the block's origin (negative: padding before it).
  big = seed.policy_grid((40, 40, 40), 16, (0, 8))
  assert np.array_equal(big, seed.policy_grid((40, 40, 40), 16, (0, 8), origin_zyx=(0, 0, 0)))
  for origin in ((5, 7, 9), (-3, 0, 17)):
    shape = np.array((20, 20, 20))
    got = seed.policy_grid(tuple(shape), 16, (0, 8), origin_zyx=origin) + origin
    want = big[np.all((big >= np.asarray(origin)) & (big < np.asarray(origin) + shape), axis=1)]
    assert len(want) and np.array_equal(got, want), origin


# ----------------------------------------------------------------------------------- canvas
def test_canvas_segments_objects_and_min_size():
  labels = voronoi_labels()
  c = make_canvas(labels)
  c.segment_all()
  seg = c.segmentation
  assert c.counters["segments"] >= 5
  assert c.counters["fov_calls"] == c.counters["batches"]
  for sid, (start, iters, size) in c.origins.items():
    assert iters > 1 and size == np.sum(seg == sid) >= 50
    obj = labels[start]
    # Own object fully claimed unless an earlier segment got there first (weak overlaps).
    assert np.all((seg == sid) <= ((labels == obj) | (labels == obj + 1)))
  assert c.counters["seeds_skipped_segmented"] > 0  # later seeds inside done objects
  big = make_canvas(labels, min_segment_size=10**6)
  big.set_seeds(big.seeds.coords[:40])  # every seed floods its object in vain: keep it short
  big.segment_all()
  assert big.counters.get("segments", 0) == 0 and not big.segmentation.any()
  assert big.counters["failed_too_small"] == big.counters["seeds_tried"] > 0


def test_weak_seed_aborts_segment():
  labels = voronoi_labels()

  def weakening(image_BZYX, seed_BZYX):  # keeps the seed voxel only for the first FOV
    out = stub_predict()(image_BZYX, seed_BZYX)
    if (seed_BZYX > 2.0).sum() > 1:
      out[:] = -1.0
    return out

  c = make_canvas(labels, predict=weakening)
  c.segment_all()
  assert c.counters.get("segments", 0) == 0
  assert c.counters["failed_weak_seed"] > 0


def test_mask_restricts_seeds_and_moves():
  labels = voronoi_labels()
  mask = np.zeros(labels.shape, bool)
  mask[:, :, 17:] = True
  image = (labels * 10).astype(np.float32)
  c = canvas_lib.Canvas(image, stub_predict(), 1, FOV, DELTAS,
                        options_lib.InferenceOptions(min_segment_size=50), mask=mask)
  c.set_seeds(seed.policy_grid(image.shape, step=6, offsets=(4, 7)))
  c.segment_all()
  assert c.counters["segments"] > 0
  assert all(start[2] < 17 for start, _, _ in c.origins.values())
  assert not c.segmentation[:, :, 17 + FOV[2] // 2 + 1:].any()  # FOVs centred left of the mask


@pytest.mark.parametrize("batch_size,max_pending", [(2, None), (5, None), (3, 60)])
def test_batched_equals_sequential(batch_size, max_pending):
  labels = voronoi_labels(n=9, rng_seed=3)
  seq = make_canvas(labels, 1)
  seq.segment_all()
  bat = make_canvas(labels, batch_size)
  bat.max_pending = max_pending or bat.max_pending
  bat.segment_all()
  assert np.array_equal(seq.segmentation, bat.segmentation)
  assert seq.origins == bat.origins
  assert {k: [a.tolist() for a in v] for k, v in seq.overlaps.items()} == \
         {k: [a.tolist() for a in v] for k, v in bat.overlaps.items()}
  for k in ("segments", "voxels_labelled", "voxels_overlapping", "seeds_tried",
            "failed_too_small"):
    assert seq.counters.get(k, 0) == bat.counters.get(k, 0), k
  # Which of the two skip reasons a dropped speculative seed gets can differ; the total cannot.
  skipped = lambda c: c.get("seeds_skipped_segmented", 0) + c.get("seeds_skipped_boundary", 0)
  assert skipped(seq.counters) == skipped(bat.counters)
  assert bat.counters["batches"] < seq.counters["batches"]
  assert bat.counters["fov_calls"] == (seq.counters["fov_calls"]
                                       + bat.counters.get("fov_wasted", 0))
  for c in (seq, bat):  # object maps are recycled: all given back, and back to all NaN
    assert c.maps.in_use == 0 and c.maps.free
    assert all(np.isnan(m).all() for m in c.maps.free)
  assert bat.counters.get("speculative_restarts", 0) + bat.counters.get("speculative_drops", 0)


@pytest.mark.parametrize("batch_size,kill_after", [(1, 9), (1, 40), (3, 25)])
def test_resume_equals_uninterrupted(tmp_path, batch_size, kill_after):
  labels = voronoi_labels(n=9, rng_seed=3)
  ref = make_canvas(labels, batch_size)
  ref.segment_all()

  calls = []
  first = make_canvas(labels, batch_size, predict=stub_predict(calls, fail_after=kill_after))
  path = os.path.join(tmp_path, "state.npz")

  def save(c):  # checkpoint after every batch, like checkpoint_interval_s = 0
    with open(path, "wb") as f:
      np.savez_compressed(f, **c.state_dict())

  with pytest.raises(KeyboardInterrupt):
    first.segment_all(save)
  with np.load(path, allow_pickle=False) as z:
    state = {k: z[k] for k in z.files}
  if batch_size == 1 and kill_after == 9:
    assert "head_seed" in state  # killed in the middle of a segment
  second = make_canvas(labels, batch_size)
  second.set_seeds(np.zeros((0, 3), np.int64))
  second.load_state(state)
  second.segment_all()
  assert np.array_equal(second.segmentation, ref.segmentation)
  assert second.origins == ref.origins
  assert second.counters["segments"] == ref.counters["segments"]


# ----------------------------------------------------------------------------------- predictor
def test_predictor_pads_to_fixed_batches():
  import jax
  from ffn_jax import model
  from ffn_jax.inference.predict import Predictor
  net = model.FFN(depth=2, features=4)
  params = jax.tree_util.tree_map(np.asarray, model.init_params(net, jax.random.PRNGKey(1), FOV))
  rng = np.random.default_rng(0)
  image = rng.normal(size=(3, *FOV)).astype(np.float32)
  seed_logits = rng.normal(size=(3, *FOV)).astype(np.float32)
  want = np.asarray(net.apply({"params": params}, image[..., None], seed_logits[..., None]))
  pred = Predictor(params, 2, 4, FOV, batch_size=4)
  assert pred.buckets == [1, 2, 4]
  np.testing.assert_allclose(pred(image, seed_logits), want[..., 0], atol=1e-5)
  np.testing.assert_allclose(pred(image[:1], seed_logits[:1]), want[:1, ..., 0], atol=1e-5)
  assert (pred.fov_calls, pred.batches, pred.padded_fovs) == (4, 2, 1)
  full = Predictor(params, 2, 4, FOV, batch_size=4, pad="full")
  assert full.buckets == [4]
  full(image[:1], seed_logits[:1])
  assert full.padded_fovs == 3


def test_pad_batches_auto_follows_the_backend_and_bad_values_are_refused():
  import jax
  from ffn_jax import model
  from ffn_jax.errors import UserError
  from ffn_jax.inference import job as job_lib
  from ffn_jax.inference import settings
  from configs import fib25_infer
  cfg = fib25_infer.get_config()
  cfg.batch_size = 8
  assert cfg.pad_batches == "auto"
  net = model.FFN(depth=2, features=4)
  params = jax.tree_util.tree_map(np.asarray, model.init_params(net, jax.random.PRNGKey(1), FOV))
  spec = {"depth": 2, "features": 4, "fov_size_zyx": FOV}
  pred = job_lib.InferenceJob(cfg, params, spec, None, 0.0, 1.0, ("xla", "float32", "")).predictor
  want = [1, 2, 4, 8] if jax.default_backend() == "cpu" else [8]
  assert pred.buckets == want
  cfg.pad_batches = "some"
  with pytest.raises(UserError, match="pad_batches must be"):
    settings.flood_options(cfg)


# ----------------------------------------------------------------------------------- priors
def exact_predict(image_BZYX, seed_BZYX):
  """Oracle FFN that floods exactly the object under the FOV's confident seed voxels."""
  out = np.full_like(seed_BZYX, -4.0)
  for b in range(image_BZYX.shape[0]):
    img, s = image_BZYX[b], seed_BZYX[b]
    sure = s > 2.0
    if sure.any():
      vals, counts = np.unique(img[sure], return_counts=True)
      out[b] = np.where(img == vals[np.argmax(counts)], 4.0 - 0.05 * _RADIUS, -4.0)
  return out


def prior_canvas(labels, batch_size=1, predict=exact_predict, width=6):
  """A canvas whose first ``width`` x slices hold the truth as prior labels (renumbered)."""
  image = (labels * 10).astype(np.float32)
  prior = np.zeros(labels.shape, np.int32)
  ids = np.unique(labels[:, :, :width])
  prior[:, :, :width] = np.searchsorted(ids, labels[:, :, :width]) + 1
  c = canvas_lib.Canvas(image, predict, batch_size, FOV, DELTAS,
                        options_lib.InferenceOptions(min_segment_size=50), prior=prior)
  c.set_seeds(seed.policy_grid(image.shape, step=6, offsets=(4, 7)))
  return c, ids


def test_prior_objects_are_continued_under_their_own_label():
  labels = voronoi_labels(n=9, rng_seed=3)
  c, ids = prior_canvas(labels)
  c.segment_all()
  seg = c.segmentation
  assert c.counters["continued"] == len(ids) and c.counters["voxels_continued"] > 0
  for k, obj in enumerate(ids, start=1):  # each prior object grew over (nearly) all of itself
    assert np.all(labels[seg == k] == obj) and set(np.unique(seg[labels == obj])) <= {0, k}
    assert np.mean(seg[labels == obj] == k) > 0.9, obj
  # The objects that never touch the prior slab are new segments, numbered above the priors.
  others = sorted(set(np.unique(labels)) - set(ids))
  assert c.counters["segments"] == len(others) and min(c.origins) == 1
  for obj in others:
    got = set(np.unique(seg[labels == obj])) - {0}
    assert len(got) == 1 and got.pop() > len(ids)
  # Prior voxels are never relabelled, even where an object's flood reaches them.
  assert np.array_equal(seg[:, :, :6], c.prior[:, :, :6])


def test_continuation_starts_cover_each_object_once_per_lattice_cell():
  prior = np.zeros((20, 20, 20), np.int32)
  prior[:, :, :8] = 2
  prior[5:15, 5:15, :8] = 1
  starts = canvas_lib.continuation_starts(prior, (4, 4, 4), (3, 3, 3))
  assert [label for label, _ in starts] == [1, 2]
  for label, zyx in starts:
    assert np.all(prior[tuple(zyx.T)] == label)
    assert np.all((zyx >= 4) & (zyx < 16))  # a FOV fits
    cells = {tuple(v) for v in zyx // 3}
    assert len(cells) == len(zyx)  # one start per cell
  mask = np.zeros(prior.shape, bool)
  mask[:, :, :8] = True
  assert canvas_lib.continuation_starts(prior, (4, 4, 4), (3, 3, 3), mask) == []


@pytest.mark.parametrize("batch_size,kill_after", [(1, 7), (3, 20)])
def test_continuations_batched_and_resumed_equal_sequential(batch_size, kill_after):
  labels = voronoi_labels(n=9, rng_seed=3)
  ref, _ = prior_canvas(labels, predict=stub_predict())  # the stub's weak overlaps interact
  ref.segment_all()
  bat, _ = prior_canvas(labels, batch_size, predict=stub_predict())
  bat.segment_all()
  assert np.array_equal(ref.segmentation, bat.segmentation) and ref.origins == bat.origins

  calls, states = [], []
  first, _ = prior_canvas(labels, batch_size, predict=stub_predict(calls, fail_after=kill_after))
  with pytest.raises(KeyboardInterrupt):
    first.segment_all(lambda c: states.append(c.state_dict()))
  state = {k: np.array(v) for k, v in states[-1].items()}
  assert int(state["cont_idx"]) < len(first.continuations)  # killed among the continuations
  second = canvas_lib.Canvas((labels * 10).astype(np.float32), stub_predict(), batch_size, FOV,
                             DELTAS, options_lib.InferenceOptions(min_segment_size=50))
  second.set_seeds(np.zeros((0, 3), np.int64))
  second.load_state(state)
  second.segment_all()
  assert np.array_equal(second.segmentation, ref.segmentation) and second.origins == ref.origins


def canvas_joins(c, min_voxels=100, min_fraction=0.9):
  """``tiling.joins`` of a finished canvas with prior labels."""
  n = max(c.n_prior, int(c.segmentation.max())) + 1
  return tiling.joins({s: dict(zip(*c.overlaps[s])) for s in c.overlaps}, c.n_prior,
                      np.bincount(c.prior.ravel(), minlength=n),
                      np.bincount(c.segmentation.ravel(), minlength=n), min_voxels, min_fraction)


def test_an_object_entering_through_two_faces_is_joined_once_and_only_with_itself():
  """Prior labels on two faces (x < 6 and y < 6, numbered apart): the continuation of an object
  from the first face floods over its own prior voxels on the second, which it may not
  relabel; its overlaps make the two labels one object (``tiling.joins``), and nothing else."""
  labels = voronoi_labels(n=9, rng_seed=3)
  prior = np.zeros(labels.shape, np.int32)
  prior[:, :, :6] = labels[:, :, :6]
  prior[:, :6, 6:] = labels[:, :6, 6:] + 100
  ids = np.unique(prior[prior > 0])
  prior = (np.searchsorted(ids, prior) + 1) * (prior > 0)
  obj = lambda k: ids[k - 1] % 100  # noqa: E731
  c = canvas_lib.Canvas((labels * 10).astype(np.float32), exact_predict, 1, FOV, DELTAS,
                        options_lib.InferenceOptions(min_segment_size=50), prior=prior)
  c.set_seeds(seed.policy_grid(labels.shape, step=6, offsets=(4, 7)))
  c.segment_all()
  big = lambda block: {v for v, n in zip(*np.unique(block, return_counts=True)) if n >= 100}  # noqa: E731
  both = big(labels[:, :, :6]) & big(labels[:, :6, 6:])  # join[0]: at least 100 voxels
  joins = canvas_joins(c, 100, 0.6)  # the oracle's flood reaches ~70 % of a face's piece
  assert both and joins
  assert all(obj(a) == obj(b) for a, b in joins)  # never two different objects
  assert {obj(a) for a, _ in joins} == both  # every object on both faces


@pytest.mark.parametrize("objects,batch_size,seed_step", [(30, 4, 4), (60, 8, 3), (12, 1, 5)])
def test_flood_progress_counts_fovs_and_estimates_those_left_within_2x(objects, batch_size,
                                                                       seed_step):
  """progress.FloodProgress: from a tenth of the FOVs on, until the last tenth, its estimate of
  the FOVs still to come is within 2x of the truth, batched or not (seeds resolved in order
  would say little: batched floods commit in seed order, and late seeds mostly cost nothing)."""
  from ffn_jax.inference import progress
  labels = voronoi_labels(shape=(40, 40, 40), n=objects, rng_seed=2)
  image = (labels * 10).astype(np.float32)
  c = canvas_lib.Canvas(image, exact_predict, batch_size, FOV, DELTAS,
                        options_lib.InferenceOptions(min_segment_size=50))
  c.set_seeds(seed.policy_grid(image.shape, step=seed_step, offsets=(1,)))
  lines = []
  meter = progress.FloodProgress(c, 0.0, lines.append)
  estimates = []

  def on_step(canvas):
    meter.update()
    estimates.append(meter.fovs_left())

  c.segment_all(on_step)
  total = c.counters["fov_calls"]
  checked = [(left, total - done) for done, left in estimates
             if done >= 0.1 * total and total - done >= 0.1 * total]
  assert len(checked) > 10
  for left, true in checked:
    assert true / 2 <= left <= 2 * true, (left, true)
  assert estimates[-1] == (total, 0.0)
  assert "% done" in lines[-1] and "ETA" in lines[-1] and f"fov {total}" in lines[-1]


def test_covered_voxels_are_the_committed_ones_and_those_in_flight_maps_reach():
  """Canvas.covered_voxels reads each in-flight map only in its written box: the same count as
  the union over whole maps, at every step, and the labelled voxels at the end."""
  labels = voronoi_labels(shape=(30, 30, 30), n=12, rng_seed=4)
  c = canvas_lib.Canvas((labels * 10).astype(np.float32), exact_predict, 4, FOV, DELTAS,
                        options_lib.InferenceOptions(min_segment_size=50))
  c.set_seeds(seed.policy_grid(labels.shape, step=5, offsets=(1,)))
  seen = []

  def on_step(canvas):
    whole = canvas.segmentation != 0
    for job in canvas.jobs:
      if job.seed is not None:
        whole |= job.seed >= canvas.th.segment
    seen.append((canvas.covered_voxels(), int(whole.sum()), int(np.count_nonzero(
        canvas.segmentation))))

  c.segment_all(on_step)
  assert all(fast == whole for fast, whole, _ in seen)
  assert any(fast > committed for fast, _, committed in seen)  # maps in flight count
  assert c.covered_voxels() == np.count_nonzero(c.segmentation) > 0


class _ScriptedCanvas:
  """What progress.FloodProgress reads of a canvas, set by hand."""

  def __init__(self, size):
    self.counters = {"fov_calls": 0}
    self.segmentation = np.zeros(size, np.int32)
    self.open, self.covered = 100, 0

  def open_candidates(self):
    return self.open

  def covered_voxels(self):
    return self.covered

  def progress(self):
    return 0, 100


def test_flood_progress_takes_the_longer_of_the_candidate_and_coverage_estimates():
  """The two estimates of the FOVs left (docs/inference.md): open candidates x FOVs per closed
  candidate, and voxels left to cover (to EXPECTED_COVERAGE of the canvas) x FOVs per voxel
  covered. A large object flooding closes no candidate but covers voxels: the coverage estimate
  holds the ETA up; a canvas covered early with candidates left: the candidate estimate does."""
  from ffn_jax.inference import progress
  c = _ScriptedCanvas(1000)
  meter = progress.FloodProgress(c, -1, None)
  meter.update()  # the first batch: 100 candidates open
  c.counters["fov_calls"], c.open, c.covered = 100, 80, 200  # 20 closed, 200 voxels covered
  # candidates: 80 x 100 / 20 = 400; coverage: (800 - 200) x 100 / 200 = 300
  assert meter.fovs_left() == (100, 400.0)
  c.counters["fov_calls"], c.open, c.covered = 200, 10, 250  # many cheap candidates closed
  # candidates: 10 x 200 / 90 = 22.2; coverage: (800 - 250) x 200 / 250 = 440
  assert meter.fovs_left() == (200, 440.0)
  c.counters["fov_calls"], c.covered = 400, 500  # a large object floods: no candidate closes
  # candidates: 10 x 400 / 90 = 44.4; coverage: (800 - 500) x 400 / 500 = 240
  assert meter.fovs_left() == (400, 240.0)
  c.counters["fov_calls"], c.open, c.covered = 700, 5, 950  # beyond EXPECTED_COVERAGE
  assert meter.fovs_left() == (700, pytest.approx(5 * 700 / 95))
  c.open = 0
  assert meter.fovs_left() == (700, 0.0)
  assert progress.EXPECTED_COVERAGE == 0.8


def test_tiled_progress_counts_tiles_done_and_the_current_tile(monkeypatch):
  from ffn_jax.inference import progress
  clock = [100.0]
  monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
  done = [2]
  meter = progress.TiledProgress(lambda: done[0], 10, rank=1).start("z0_y0_x1")
  assert np.isnan(meter.estimate(0.0)[1])
  clock[0] += 60.0
  done[0] = 3  # one tile finished (by any rank), this rank's current one half done: 1.5 tiles
  assert meter.estimate(0.5) == (3, 60.0 / 1.5 * 6.5)
  line = meter.line(0.5, "fov 10 (1.00/s)")
  assert line.startswith("rank 1: tile z0_y0_x1: fov 10") and "tiles 3/10 done, job ETA 4m20s" in line
