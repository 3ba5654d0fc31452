"""Tiny FFN on a generated synthetic EM volume: runs anywhere in well under a minute.

All zyx. Every field here exists in every config; fib25.py overrides the paper-scale ones.
"""
import ml_collections

from configs import fib25_infer


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.depth = 3
  c.model.features = 16
  c.model.fov_size_zyx = (17, 17, 17)
  c.model.deltas_zyx = (4, 4, 4)
  c.model.conv_impl = "auto"  # see ffn_jax.conv.available_routes()
  # float32 | bfloat16 (bf16 conv operands, float32 accumulation, parameters, optimizer and
  # loss) | auto (bfloat16 where the hardware has it natively and ffn_jax.conv.AUTO_PICKS_BF16;
  # the log says what it picked and why). Recorded in checkpoints; inference follows it.
  c.model.compute_dtype = "auto"
  # glorot_uniform (Google's current default) or truncated_normal (sd 0.01: how Google's released
  # model was first trained, over 27M steps; it stalls on short budgets).
  c.model.kernel_init = "glorot_uniform"

  c.data = ml_collections.ConfigDict()
  c.data.image = ""   # volume spec (zarr/n5/precomputed path, 'file.h5:ds', tensorstore JSON);
  c.data.labels = ""  # '' for both = generate a synthetic volume
  c.data.synthetic_shape_zyx = (48, 80, 80)
  c.data.synthetic_objects = 16
  c.data.synthetic_seed = 0
  c.data.box_start_zyx = (0, 0, 0)  # training region inside the volumes (zyx)
  c.data.box_size_zyx = ()          # () = whole volume
  c.data.image_mean = 155.0
  c.data.image_stddev = 34.0
  c.data.lom_radius_zyx = (6, 6, 6)
  c.data.thresholds = (0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
  c.data.min_size = 100
  c.data.fov_moves = 1
  # "reflect": mirror the training volumes by half a training block, so that example centres
  # cover the whole training region (thin volumes: with FOV 33^3 and 8^3 deltas, a 50-slice
  # volume leaves centres on 2 slices only). "none": centres stay half a block inside.
  c.data.border_padding = "none"
  c.data.move_threshold = 0.9
  c.data.augment = True
  # New examples cut ahead in a background thread while the device computes (bit-identical
  # batches). -1 = auto: one batch ahead when training on an accelerator, off on CPU (there the
  # thread takes cores from the convolutions); 0 = off; N > 0 = N examples ahead.
  c.data.prefetch_examples = -1

  c.batch_size = 4  # per local device; global batch = batch_size x local devices x ranks
  # > 0: fixes the global batch instead; it must divide evenly over ranks x local devices, and
  # each device then takes global_batch / (ranks x local devices) (batch_size is ignored).
  c.global_batch = 0

  # Fine-tuning: start from these parameters (an imported checkpoint, e.g. from
  # ffn_jax.import_tf_checkpoint, or another run's workdir) with a fresh optimizer and step 0.
  # The run's own checkpoints win: a rerun resumes from them, not from init_checkpoint.
  c.init_checkpoint = ""

  c.optim = ml_collections.ConfigDict()
  # sgd, momentum, nesterov, adam, adamw, lamb, lars; or "custom" with optim.factory: a
  # "module:function" called with the learning-rate schedule (warmup and scaling applied) that
  # returns any optax GradientTransformation (e.g. configs.optimizers:lion).
  c.optim.name = "adam"
  c.optim.factory = ""
  c.optim.learning_rate = 1e-3  # at reference_batch global examples
  c.optim.reference_batch = 4
  c.optim.lr_scaling = "none"  # none, linear, sqrt
  c.optim.schedule = "constant"  # constant, cosine, exponential, step
  c.optim.warmup_steps = 0
  c.optim.warmup_init_fraction = 0.0
  c.optim.decay_steps = 1000
  c.optim.decay_rate = 0.5
  c.optim.step_boundaries = (1000000,)
  c.optim.final_lr_fraction = 0.0
  c.optim.momentum = 0.9
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.clip_value = 0.7  # Google FFN's element-wise gradient clipping; 0 disables
  c.optim.clip_global_norm = 0.0
  # Exponential moving average of the parameters (0 = off): evaluated, kept in checkpoints and
  # used by infer.py in place of the raw parameters; decay min(ema_decay, (1+t)/(10+t)).
  c.optim.ema_decay = 0.0

  # Segmentation validation during training: flood-fill the held-out volume with the current
  # parameters (infer.py's code and settings), score VI / adapted Rand and the skeleton scores
  # (expected run length, merges, splits: ffn_jax.skeleton_metrics) against its labels, append
  # {"eval": true, ...} to metrics.jsonl and keep the best checkpoint in WORKDIR/best.
  # Runs every eval.every_steps steps and/or every eval.every_s seconds (both 0 = off), and at
  # the last step. Point it at held-out data: a validation volume, or a box the training box
  # does not contain.
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0
  c.eval.every_s = 0.0
  c.eval.at_start = False  # also evaluate the starting parameters (step 0 of a fresh run)
  c.eval.image = ""   # volume specs; '' for both = a synthetic volume like data's, with
  c.eval.labels = ""  # eval.synthetic_seed
  c.eval.synthetic_seed = 1000
  c.eval.box_start_zyx = (0, 0, 0)  # zyx
  c.eval.box_size_zyx = ()          # () = to the end of the volume
  c.eval.image_mean = -1.0    # <= 0: data.image_mean / data.image_stddev
  c.eval.image_stddev = -1.0
  c.eval.conv_impl = ""       # '' = model.conv_impl
  c.eval.compute_dtype = ""   # '' = the training's (model.compute_dtype as resolved)
  c.eval.keep_best = True     # WORKDIR/best: infer.py --config.checkpoint_kind=best
  c.eval.best_metric = "vi"   # what "best" means: "vi" (lowest) or "erl" (highest)
  c.eval.skeleton_min_nodes = 5  # skeleton nodes a segment needs to count in merges and splits
  c.eval.rank = 0             # the rank that floods (all ranks hold the same parameters)
  # At the end: calibrate move/segment thresholds and min segment size on the eval box (a
  # validation box, never the test volume) for the final model, stored in
  # WORKDIR/calibration.json for infer.py (ffn_jax.calibration; ~11 floods of the box).
  c.eval.calibrate = False
  # Time to quality: the first eval with VI <= target_vi writes a "target" record (steps,
  # examples and wall seconds of the run until then) to metrics.jsonl; 0 = no target.
  c.eval.target_vi = 0.0
  fib25_infer.add_flood_settings(c.eval)  # eval.inference.*, eval.seed_policy, eval.batch_size..
  c.eval.inference.min_segment_size = 100
  c.eval.batch_size = 4

  c.max_steps = 200
  c.tensorboard = True  # also write metrics as TensorBoard scalars to WORKDIR/tensorboard
  c.log_every = 10
  c.checkpoint_every = 50
  c.keep_checkpoints = 3
  c.sync_check_every = 50  # compare parameter fingerprints across ranks; 0 disables
  c.preemption_grace_s = 60.0  # after SIGTERM: save and exit within this time
  # No training step finished for this long (a rank died or hangs): abort every rank. 0 = off.
  c.step_timeout_s = 1800.0

  c.debug = ml_collections.ConfigDict()
  c.debug.perturb_rank = -1  # tests only: this rank perturbs its params ...
  c.debug.perturb_at_step = -1  # ... at this step (to prove the divergence check works)
  c.debug.nan_at_step = -1  # tests only: poison the loss at this step
  c.debug.preempt_save_delay_s = 0.0  # tests only: the SIGTERM save first sleeps this long
  return c
