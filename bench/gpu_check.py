"""The GPU check: correctness and speed of ffn_jax on one accelerator, in one short run.

    python bench/gpu_check.py --data DATA_DIR            # on a GPU machine (<= 5 min on an H100)
    python bench/gpu_check.py --data ../shared/data --dry # anywhere: tiny sizes (the tests run it)

``DATA_DIR`` holds ``google_ffn_fib25/`` (checkpoint, ``reference_logits.npz``) and
``fib25_training_sample2/`` (image, labels): a copy of ``../shared/data``'s, since the checkout's
``../shared`` does not travel to a device machine. Needs jax, flax, optax, orbax, tensorstore
and ml_collections; torch (CUDA) for the PyTorch peer, which is skipped, saying why, if missing.
No MPI, no internet. Steps, each reported even if another fails:

1. ``logits``: Google's checkpoint, imported, against TensorFlow's ``reference_logits.npz`` at
   precision highest (max abs difference, goal <= 1e-4).
2. ``conv_stack``: the FIB-25 conv stack (depth 12, 32 features, FOV 33^3), forward and a plain
   SGD training step at batch 64, FOV/s: ffn_jax float32 (XLA default precision: TF32 on
   Ampere+) and bfloat16 (``xla_bf16``), PyTorch channels_last_3d in TF32 and bf16 autocast.
3. ``train``: ``train.py``'s loop (recurrent FOV pipeline included) on FIB-25 at batch 64, float32
   and bfloat16: FOV/s and host overhead (``bench/train_throughput.py``).
4. ``inference``: crops c100 and c150 with Google's settings at batch 8, float32: wall time, VI and
   ARE (today's: c100 1.886 / 0.198, c150 1.658 / 0.124).

The last line of output is one JSON object with every number, the device and the versions.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import conv_stack as conv_stack_bench  # noqa: E402
import train_throughput  # noqa: E402

CROPS = {"c100": _common.FIB25_CROPS["c100"], "c150": _common.FIB25_CROPS["c150"],
         "dry": (93, 40)}  # zyx start, size (cubes)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", required=True, help="folder with google_ffn_fib25/ and "
                 "fib25_training_sample2/")
  p.add_argument("--dry", action="store_true", help="tiny sizes: checks that every step runs")
  p.add_argument("--steps", default="logits,conv_stack,train,inference")
  p.add_argument("--batch", type=int, default=64, help="conv stack and train.py batch")
  p.add_argument("--repeats", type=int, default=10, help="timed conv-stack calls (median)")
  args = p.parse_args(argv)
  args.steps = [s for s in args.steps.split(",") if s]
  args.data = os.path.abspath(args.data)
  if args.dry:
    args.batch, args.repeats = 2, 2
  return args


def timed(fn, repeats: int, warmup: int = 2) -> float:
  """Median seconds of ``fn()`` (which must block until its work is done)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


# ------------------------------------------------------------------------------------- steps
def check_logits(args, ckpt: str) -> dict:
  import jax
  import numpy as np
  from ffn_jax import checkpoint, model as model_lib
  params, _ = checkpoint.load_params(ckpt)
  ref = np.load(os.path.join(args.data, "google_ffn_fib25", "reference_logits.npz"))
  cases = [("A", "seed_A", "logits_A"), ("B", "seed_B", "logits_B"), ("C", "seed_C", "logits_C"),
           ("A", "logits_A", "logits_A_step2")]
  image = (np.stack([ref[f"image_{c}"] for c, _, _ in cases]).astype(np.float32) - 128) / 33
  seed = np.stack([ref[s] for _, s, _ in cases]).astype(np.float32)
  net = model_lib.FFN(depth=12, conv_impl="auto")
  with jax.default_matmul_precision("highest"):
    out = np.asarray(jax.jit(net.apply)({"params": params}, image[..., None], seed[..., None]))
  err = max(float(np.abs(out[b, ..., 0] - ref[key]).max()) for b, (_, _, key) in
            enumerate(cases))
  return {"max_abs_diff": err, "ok": err <= 1e-4}


def conv_stack(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from ffn_jax import conv as conv_lib, model as model_lib
  depth, fov = (2, 9) if args.dry else (12, 33)
  b = args.batch
  rng = np.random.default_rng(0)
  image = rng.random((b, fov, fov, fov, 1), np.float32)
  seed = rng.normal(0, 1, image.shape).astype(np.float32)
  labels = (rng.random(image.shape) > 0.5).astype(np.float32)
  out = {"batch": b, "depth": depth, "fov": fov}
  for dtype in ("float32", "bfloat16"):
    route = conv_lib.select("auto", dtype)[0]
    net = model_lib.FFN(depth=depth, features=32, conv_impl=route)
    params = model_lib.init_params(net, jax.random.PRNGKey(0), (fov,) * 3)
    fwd = jax.jit(lambda p, i, s: net.apply({"params": p}, i, s))

    def loss(p, i, s, y):
      return jnp.mean(optax.sigmoid_binary_cross_entropy(net.apply({"params": p}, i, s), y))

    @jax.jit
    def step(p, i, s, y):
      g = jax.grad(loss)(p, i, s, y)
      return jax.tree.map(lambda a, d: a - 1e-3 * d, p, g)

    state = {"p": params}
    run_fwd = lambda: fwd(state["p"], image, seed).block_until_ready()  # noqa: E731

    def run_train():
      state["p"] = step(state["p"], image, seed, labels)
      jax.block_until_ready(state["p"])

    out[f"jax_{dtype}"] = {"route": route,
                           "forward_fovs_per_s": b / timed(run_fwd, args.repeats),
                           "train_fovs_per_s": b / timed(run_train, args.repeats)}
  out.update(torch_peer(args, depth, fov, image, seed, labels))
  jb, tb = out["jax_bfloat16"], out.get("torch_bf16")
  if tb:
    out["train_bf16_ratio_vs_torch_bf16"] = jb["train_fovs_per_s"] / tb["train_fovs_per_s"]
    out["forward_bf16_ratio_vs_torch_bf16"] = jb["forward_fovs_per_s"] / tb["forward_fovs_per_s"]
  return out


def torch_peer(args, depth, fov, image, seed, labels) -> dict:
  try:
    import torch
    import torch.nn.functional as F
  except ImportError as e:
    return {"torch": f"skipped: {e}"}
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu" and not args.dry:
    return {"torch": "skipped: no CUDA device"}
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True

  fmt = torch.channels_last_3d
  model = conv_stack_bench.torch_ffn(depth, 32).to(device).to(memory_format=fmt)
  to_t = lambda a: torch.from_numpy(a).permute(0, 4, 1, 2, 3).to(device).contiguous(  # noqa
      memory_format=fmt)
  i, s, y = to_t(image), to_t(seed), to_t(labels)
  params = list(model.parameters())
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  out = {"torch": f"torch {torch.__version__} on {device}, channels_last_3d"}
  for name, dtype in (("torch_tf32", None), ("torch_bf16", torch.bfloat16)):
    def ctx():
      return (torch.autocast(device, dtype=dtype) if dtype is not None
              else torch.autocast(device, enabled=False))

    def run_fwd():
      with torch.inference_mode(), ctx():
        model(i, s)
      sync()

    def run_train():
      with ctx():
        loss = F.binary_cross_entropy_with_logits(model(i, s).float(), y)
      loss.backward()
      with torch.no_grad():
        torch._foreach_add_(params, [p.grad for p in params], alpha=-1e-3)  # pylint: disable=protected-access
      for p in params:
        p.grad = None
      sync()

    b = image.shape[0]
    out[name] = {"forward_fovs_per_s": b / timed(run_fwd, args.repeats),
                 "train_fovs_per_s": b / timed(run_train, args.repeats)}
  return out


def train(args) -> dict:
  out = {}
  data = os.path.join(args.data, "fib25_training_sample2")
  config_name = "configs/tiny.py" if args.dry else "configs/fib25.py"
  steps, warmup = (2, 1) if args.dry else (20, 3)
  for dtype in ("float32", "bfloat16"):
    overrides = [f"model.compute_dtype={dtype}", f"batch_size={args.batch}", "eval.every_s=0",
                 "eval.every_steps=0"]
    if not args.dry:
      overrides += [f"data.image={data}/image.zarr", f"data.labels={data}/labels.zarr"]
    config = _common.load_config(config_name, overrides)
    with tempfile.TemporaryDirectory() as workdir:
      stats = train_throughput.measure(config, steps, warmup, workdir)
    r = train_throughput.summarize(config, stats)
    out[dtype] = {k: r[k] for k in ("fovs_per_s", "step_wall_s", "compute_s", "data_s",
                                    "other_host_s", "host_overhead_fraction", "global_batch")}
  return out


def inference(args, ckpt: str) -> dict:
  import numpy as np
  from configs import fib25_infer
  from ffn_jax import evaluation
  from ffn_jax.data import volumes
  from ffn_jax.inference import runner
  data = os.path.join(args.data, "fib25_training_sample2")
  out = {}
  for crop in (["dry"] if args.dry else ["c100", "c150"]):
    start, size = CROPS[crop]
    c = fib25_infer.get_config()
    c.image = os.path.join(data, "image.zarr")
    c.checkpoint = ckpt
    c.bbox_start_zyx, c.bbox_size_zyx = (start,) * 3, (size,) * 3
    c.batch_size = 2 if args.dry else 8
    c.compute_dtype = "float32"
    c.progress_interval_s = -1.0
    c.preview_slices = 0
    if args.dry:
      c.inference.min_segment_size = 100
    with tempfile.TemporaryDirectory() as workdir:
      t0 = time.perf_counter()
      counters = runner.run(c, workdir)
      wall = time.perf_counter() - t0
      seg = volumes.open_volume(os.path.join(workdir, runner.SEGMENTATION)).read()
    truth = volumes.open_volume(os.path.join(data, "labels.zarr")).read((start,) * 3, (size,) * 3)
    m = evaluation.evaluate_segmentation(seg, truth)
    out[crop] = {"wall_s": wall, "vi": m["vi"], "are": m["are"],
                 "fov_calls": counters["fov_calls"], "segments": counters["segments"],
                 "predict_s": counters.get("time_predict_s"),
                 "compile_s": counters.get("time_compile_s"),
                 "host_s": counters.get("time_host_s"),
                 "labelled": float(np.mean(seg > 0))}
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  t_start = time.perf_counter()
  import jax
  from ffn_jax import import_tf_checkpoint, checkpoint
  result = {"benchmark": "gpu_check", "dry": args.dry, "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "cpu": _common.machine(), "steps": {}}
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = os.path.join(tmp, "fib25_google")
    params, meta = import_tf_checkpoint.import_checkpoint(
        os.path.join(args.data, "google_ffn_fib25", "model.ckpt-27465036"))
    checkpoint.save_params(ckpt, params, step=meta["global_step"], meta=meta)
    runs = {"logits": lambda: check_logits(args, ckpt), "conv_stack": lambda: conv_stack(args),
            "train": lambda: train(args), "inference": lambda: inference(args, ckpt)}
    for name in args.steps:
      t0 = time.perf_counter()
      try:
        result[name] = runs[name]()
        status = "ok"
      except Exception as e:  # noqa: BLE001 - report and go on to the next step
        traceback.print_exc()
        result[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        status = "error"
      result["steps"][name] = {"status": status, "s": time.perf_counter() - t0}
      print(f"# {name}: {status} in {time.perf_counter() - t0:.1f} s", flush=True)
  result["wall_s"] = time.perf_counter() - t_start
  _common.emit_json(_common.rounded(result))
  return 0 if all(s["status"] == "ok" for s in result["steps"].values()) else 1


if __name__ == "__main__":
  sys.exit(main())
