import numpy as np
import pytest

from ffn_jax.data import augment, partitions, synthetic
from ffn_jax.data.examples import RecurrentExamples, fixed_policy_offsets
from ffn_jax.errors import UserError
from ffn_jax.model import logit


def test_synthetic_volume_is_deterministic_and_em_like():
  image, labels = synthetic.make_volume((24, 40, 40), n_objects=8, seed=3)
  image2, labels2 = synthetic.make_volume((24, 40, 40), n_objects=8, seed=3)
  np.testing.assert_array_equal(image, image2)
  np.testing.assert_array_equal(labels, labels2)
  assert image.dtype == np.uint8 and labels.dtype == np.uint32 and labels.min() >= 1
  # Membranes (voxels next to another label) are darker than object interiors.
  boundary = np.zeros(labels.shape, bool)
  boundary[:, :, 1:] |= labels[:, :, 1:] != labels[:, :, :-1]
  assert image[boundary].mean() < image[~boundary].mean() - 30
  other, _ = synthetic.make_volume((24, 40, 40), n_objects=8, seed=4)
  assert not np.array_equal(image, other)


def test_partitions_quantize_local_object_fraction():
  labels = np.ones((9, 9, 9), np.uint32)
  labels[:, :, 5:] = 2
  parts = partitions.compute_partitions(labels, [0.5, 0.99], (1, 1, 1))
  # Deep inside object 1 the 3^3 box is all object 1 (fraction 1 -> class 3); at the interface,
  # 2/3 of the box is own label (class 2); at the volume corner zero padding lowers it.
  assert parts[4, 4, 1] == 3
  assert parts[4, 4, 4] == 2 and parts[4, 4, 5] == 2
  assert parts[0, 0, 0] == 1  # 8/27 of the box is inside the volume
  margin = partitions.compute_partitions(labels, [0.5], (1, 1, 1), margin_zyx=(2, 0, 0))
  assert not margin[:2].any() and not margin[-2:].any() and margin[2:-2].all()


def test_partitions_exclude_small_objects_and_background():
  labels = np.zeros((10, 10, 10), np.uint32)
  labels[1:8, 1:8, 1:8] = 5
  labels[9, 9, 9] = 7
  parts = partitions.compute_partitions(labels, [0.5], (1, 1, 1), min_size=2)
  assert parts[labels == 0].max() == 0 and parts[9, 9, 9] == 0 and parts[4, 4, 4] > 0


def test_balanced_sampler_draws_classes_equally_and_shards_disjointly():
  rng = np.random.default_rng(0)
  coords = [rng.integers(0, 50, (n, 3)).astype(np.int32) for n in (5, 50, 500)]
  s = partitions.BalancedSampler(coords, seed=1)
  classes = np.bincount([s.class_of(s.next_index()) for _ in range(s.total)], minlength=3)
  np.testing.assert_array_equal(classes, [500, 500, 500])  # one epoch: exactly balanced
  shards = []
  for rank in range(2):
    r = partitions.BalancedSampler(coords, seed=1, rank=rank, num_ranks=2)
    shards.append({r.next_index() for _ in range(r.total // 2)})
  assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == s.total
  # A new epoch reshuffles.
  a = partitions.BalancedSampler(coords, seed=1)
  first = [a.next_index() for _ in range(a.total)]
  second = [a.next_index() for _ in range(a.total)]
  assert first != second and sorted(first) == sorted(second)


def test_no_coordinates_is_a_clear_error(tmp_path):
  with pytest.raises(UserError, match="no training coordinates"):
    partitions.cached_coordinates(np.zeros((20, 20, 20), np.uint32), [0.5], (2, 2, 2), 0,
                                  (5, 5, 5), str(tmp_path))


def test_augmentation_variants_invert_and_are_distinct():
  x = np.arange(3 * 4 * 4).reshape(3, 4, 4)
  seen = set()
  for v in range(augment.NUM_VARIANTS):
    y = augment.apply(x, v)
    np.testing.assert_array_equal(augment.invert(y, v), x)
    seen.add(y.tobytes())
  assert len(seen) == 16


def _pipeline(batch_size=2, seed=0, prefetch=0):
  image, labels = synthetic.make_volume((24, 40, 40), n_objects=8, seed=0)
  fov, deltas = (9, 9, 9), (2, 2, 2)
  coords = partitions.coordinates_by_class(
      partitions.compute_partitions(labels, [0.3, 0.6, 0.9], (3, 3, 3), 10, (6, 6, 6)))
  sampler = partitions.BalancedSampler(coords, seed=seed)
  return RecurrentExamples(image.astype(np.float32), labels, sampler, batch_size, fov, deltas,
                           seed=seed, prefetch=prefetch)


def test_first_fov_is_a_fresh_example_with_soft_labels_and_seed():
  ex = _pipeline()
  batch = ex.next_batch()
  assert batch["image"].shape == batch["seed"].shape == batch["labels"].shape == (2, 9, 9, 9, 1)
  seed = batch["seed"][0, ..., 0]
  assert seed[4, 4, 4] == pytest.approx(logit(0.95))
  assert np.all(np.delete(seed.ravel(), 4 * 81 + 4 * 9 + 4) == pytest.approx(logit(0.05)))
  assert set(np.unique(batch["labels"])) <= {np.float32(0.05), np.float32(0.95)}
  assert batch["labels"][0, 4, 4, 4, 0] == pytest.approx(0.95)


def test_model_output_is_written_back_and_moves_need_threshold():
  ex = _pipeline(batch_size=1)
  offsets = fixed_policy_offsets((2, 2, 2))
  assert len(offsets) == 27 and tuple(offsets[0]) == (0, 0, 0)
  ex.next_batch()
  centre = ex.block // 2
  # Predict "object" only for the +z neighbour's centre; every other move must be skipped.
  logits = np.full((1, 9, 9, 9, 1), logit(0.05), np.float32)
  target = np.array([2, 0, 0])  # a +z shift of delta within the FOV
  logits[(0, *(4 + target), 0)] = logit(0.99)
  ex.update(logits)
  assert ex.slot_seed[(0, *(centre + target))] == pytest.approx(logit(0.99))
  batch = ex.next_batch()
  np.testing.assert_array_equal(ex.slot_pos[0], centre + target)
  assert batch["seed"][0, 4, 4, 4, 0] == pytest.approx(logit(0.99))
  # Now nothing is above threshold at any other shift: the next batch starts a new example.
  ex.update(np.full((1, 9, 9, 9, 1), logit(0.05), np.float32))
  started = ex.examples_started
  ex.next_batch()
  assert ex.examples_started == started + 1
  np.testing.assert_array_equal(ex.slot_pos[0], centre)


def test_iterator_state_restores_exactly():
  a = _pipeline()
  for _ in range(3):
    a.next_batch()
    a.update(np.random.default_rng(0).normal(size=(2, 9, 9, 9, 1)).astype(np.float32) * 4)
  state = {k: np.copy(v) for k, v in a.state().items()}
  b = _pipeline()
  b.restore(state)
  for _ in range(5):
    ba, bb = a.next_batch(), b.next_batch()
    for k in ba:
      np.testing.assert_array_equal(ba[k], bb[k])
    out = np.random.default_rng(1).normal(size=(2, 9, 9, 9, 1)).astype(np.float32) * 4
    a.update(out)
    b.update(out)


def test_prefetched_examples_give_identical_batches_and_state_across_a_restore():
  """Examples cut ahead in a thread change nothing: batches, checkpointed state, resume."""
  def run(prefetch, restore_at):
    ex, batches = _pipeline(batch_size=3, prefetch=prefetch), []
    for i in range(12):
      if i == restore_at:
        state = {k: np.copy(v) for k, v in ex.state().items()}
        ex.close()
        ex = _pipeline(batch_size=3, prefetch=prefetch)
        ex.restore(state)
      batches.append(ex.next_batch())
      # Alternate "reject everything" (every slot starts a new example) and a model that moves.
      out = np.random.default_rng(i).normal(size=(3, 9, 9, 9, 1)).astype(np.float32) * 4
      ex.update(out if i % 2 else np.full_like(out, -3.0))
    state = ex.state()
    ex.close()
    return batches, state

  want_batches, want_state = run(0, None)
  assert want_state["examples_started"] > 12  # new examples were started along the way
  for prefetch, restore_at in ((4, None), (1, 5), (16, 7)):
    batches, state = run(prefetch, restore_at)
    for want, got in zip(want_batches, batches):
      for k in want:
        np.testing.assert_array_equal(want[k], got[k])
    for k in want_state:
      np.testing.assert_array_equal(want_state[k], state[k])


def test_prefetch_setting_is_validated_and_auto_is_off_on_cpu():
  from configs import tiny
  from ffn_jax.training import config as config_lib
  from ffn_jax.training import data
  config = tiny.get_config()
  assert config.data.prefetch_examples == -1 and data.prefetch_examples(config, 8) == 0  # CPU
  config.data.prefetch_examples = 5
  assert data.prefetch_examples(config, 8) == 5
  config.data.prefetch_examples = -2
  with pytest.raises(UserError, match="data.prefetch_examples"):
    config_lib.validate_config(config)


def test_reflect_border_padding_lets_example_centres_cover_a_thin_volume():
  """data.border_padding=reflect: the volumes are mirrored by half a training block, so the
  sampling coordinates (partition margin = half a block) reach the training region's border."""
  from configs import tiny
  from ffn_jax.training import data
  config = tiny.get_config()
  config.data.synthetic_shape_zyx = (12, 40, 40)  # thinner than a training block (9 + 2 x 2)

  def centres(padding):
    config.data.border_padding = padding
    image, labels, block = data.load_training_volumes(config)
    coords = partitions.coordinates_by_class(partitions.compute_partitions(
        labels, config.data.thresholds, config.data.lom_radius_zyx, config.data.min_size,
        tuple(int(b) // 2 for b in block)))
    return image, labels, np.concatenate(coords) - block // 2  # in the unpadded volume

  image, labels, zyx = centres("reflect")
  assert image.shape == labels.shape == (12 + 12, 40 + 12, 40 + 12)  # + 2 x (13 // 2)
  assert zyx.min(axis=0).tolist() == [0, 0, 0] and zyx[:, 0].max() == 11
  with pytest.raises(UserError, match="smaller than one training example"):
    centres("none")
  with pytest.raises(UserError, match="border_padding"):
    centres("wrap")
