"""FFN inference on FIB-25 training_sample2 with Google's settings for the pretrained model.

Thresholds, seed policy and normalization are those of
``../shared/data/google_ffn_fib25/inference_training_sample2.pbtxt``. The checkpoint is required:
``--config.checkpoint=DIR`` (e.g. from ``python -m ffn_jax.import_tf_checkpoint``). The block is
``bbox_start_zyx`` + ``bbox_size_zyx`` (size entries <= 0 run to the end of the volume).
"""
import os

import ml_collections

_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def add_flood_settings(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Google's flood-fill settings for the FIB-25 model: thresholds, seed policy, batching.

  Shared by ``infer.py`` configs and the training loop's segmentation eval (``config.eval``), so
  that both flood with the same options and the same code.
  """
  c.inference = ml_collections.ConfigDict()
  c.inference.init_activation = 0.95   # all thresholds are probabilities, applied as logits
  c.inference.pad_value = 0.05
  c.inference.move_threshold = 0.9
  c.inference.segment_threshold = 0.6
  c.inference.min_segment_size = 1000
  c.inference.min_boundary_dist_zyx = (1, 1, 1)
  c.inference.disco_seed_threshold = 0.0  # Google's default; < 0 disables

  c.seed_policy = "PolicyPeaks"  # or PolicyGrid3d
  c.seed_min_distance = 3
  c.grid_step = 16
  c.grid_offsets = (0, 8, 4, 12, 2, 10, 14)
  # EDT sampling of PolicyPeaks (anisotropic data); in the training eval also the unit of the
  # skeleton lengths (ERL): (1, 1, 1) gives them in voxels.
  c.voxel_size_zyx = (1.0, 1.0, 1.0)
  # "none": the canvas is the block (Google's). "reflect": the block mirrored by half a FOV on
  # each side, so FOVs can be centred up to its borders (thin volumes); cropped back after.
  # "context": half a FOV of the real image around the block where the volume has it (a tile
  # sees its neighbours), mirrored past the volume's end. See docs/benchmarks.md section 7.
  c.border_padding = "none"

  # FOVs per device call = segments flooded at once. 1 reproduces Google's sequential order;
  # larger batches give the same segmentation (speculative segments are checked at each commit).
  c.batch_size = 1
  c.max_pending = 0  # look-ahead in seeds incl. paused segments; 0 = 1 (batch 1) or 4 x batch
  # A partial batch is padded to the next power of two ("buckets": log2(batch) + 1 compiles,
  # and fewer padded FOVs, which cost as much as real ones on a CPU) or to batch_size ("full":
  # one compile; padding is almost free on a GPU). "auto": full on an accelerator, else buckets.
  c.pad_batches = "auto"
  c.precision = "highest"  # jax matmul/conv precision (matters on GPUs: no TF32)
  return c


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.image = os.environ.get(
      "FFN_FIB25_IMAGE", os.path.join(_DATA, "fib25_training_sample2", "image.zarr"))
  c.image_mean = 128.0   # <= 0: take the checkpoint's
  c.image_stddev = 33.0
  c.mask = ""            # optional volume spec; nonzero voxels are neither seeded nor segmented
  c.bbox_start_zyx = (0, 0, 0)
  c.bbox_size_zyx = (0, 0, 0)

  c.checkpoint = ""      # required: orbax checkpoint dir (model geometry comes from its meta)
  c.checkpoint_step = -1  # -1 = latest
  # A training workdir holds its rolling checkpoints and, when it ran a segmentation eval, the
  # checkpoint with the best eval VI: "latest" or "best".
  c.checkpoint_kind = "latest"
  # auto: the flood settings calibrated for this checkpoint on validation data
  # (ffn_jax.calibration; WORKDIR/calibration.json), unless set here on the command line; off.
  c.calibration = "auto"
  c.conv_impl = "auto"   # see ffn_jax.conv.available_routes()
  # float32 | bfloat16 | auto (see ffn_jax.conv.select); '' = the compute dtype the checkpoint
  # was trained with (float32 for checkpoints that record none, e.g. imported TF ones).
  c.compute_dtype = ""

  add_flood_settings(c)

  # Whole volumes (ffn_jax.inference.tiled): tile_size_zyx > 0 segments the bbox in overlapping
  # tiles, spread over the ranks of `mpirun -n R`, and stitches them into global IDs.
  c.tile_size_zyx = (0, 0, 0)        # 0 = one box, as one job
  # At least this much overlap with each neighbour; over a FOV (33 here) for tile_mode=continue.
  c.tile_overlap_zyx = (48, 48, 48)
  # "independent": all tiles at once, joined by the stitch rule alone. "continue": tiles in two
  # checkerboard rounds; a second-round tile starts from its finished neighbours' segments and
  # floods them on into itself (one ID per object across faces; ffn_jax.inference.tiled). On
  # training data (docs/benchmarks.md section 7) independent tiles agreed best with one pass.
  c.tile_mode = "independent"
  # A tile's faces towards its neighbours get half a FOV of their image (whatever
  # border_padding says), so its FOVs reach those faces as one pass's would; the job's outer
  # faces follow border_padding. False: every tile is a box of its own (as before 2026-12-06).
  c.tile_context = False
  # Where tiles get their seeds. "job": rank 0 runs seed_policy once over the whole bbox (as one
  # pass would) and each tile tries those in its block, in that order; "tile": each tile runs the
  # policy on its own block (PolicyPeaks then moves seeds by a voxel or two: its tie-breaking
  # noise depends on the block's shape), so tiles agree less with one pass (docs/benchmarks.md
  # section 7). "halo": each tile runs the policy over its block and seed_halo voxels of the
  # job's canvas around it, keyed to volume coordinates (tie-breaking noise hashed from the
  # position), so overlapping tiles place the same seeds, as one keyed pass over the bbox would,
  # and no rank holds the bbox. "auto": job for bboxes up to 384^3 voxels (~75 bytes per voxel on
  # rank 0), halo above. Workdirs of tiles made before 2026-12-06 used "tile" (name it to resume
  # them); so do those of bboxes above 384^3 made before "halo" existed.
  c.tile_seeds = "auto"
  # The halo's width: the policy's reach (PolicyPeaks: Sobel 1, its Gaussian edge threshold ~33,
  # the distance to the nearest edge, peaks 3 apart); docs/benchmarks.md section 7 measures it.
  c.seed_halo = 48
  c.stitch = ml_collections.ConfigDict()
  # Merge two tiles' segments when they share >= min_overlap_voxels voxels in the tiles' overlap
  # and that is >= min_fraction of each one's voxels there (> 0.5: one partner at most).
  c.stitch.min_overlap_voxels = 100
  c.stitch.min_fraction = 0.6
  # Compare the tiles only >= margin voxels from every tile edge inside the bbox, where both
  # tiles' FOVs reached (below half the overlap); -1 = a quarter of the smallest overlap (the
  # middle half). 0, the whole overlap, stays the default: margins did not help on the whole
  # volume (docs/benchmarks.md section 7).
  c.stitch.margin = 0
  # tile_mode=continue: a segment whose flood covers >= join_fraction of a neighbour object's
  # voxels in the tile (and >= min_overlap_voxels) is that object (0.9: chosen on training data).
  c.stitch.join_fraction = 0.9
  c.stitch.output = ""  # '' = segmentation.zarr (zarr) or segmentation/ (precomputed)
  c.output_format = "zarr"  # of tiled runs: zarr | precomputed (neuroglancer)

  c.checkpoint_interval_s = 60.0  # inference_state.npz; 0 = after every batch, < 0 = never
  c.progress_interval_s = 10.0
  c.preview_slices = 3

  c.debug = ml_collections.ConfigDict()
  c.debug.stop_after_fov_calls = -1  # tests: stop like a kill once this many FOVs were run
  return c
