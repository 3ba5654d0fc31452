"""Times the FFN conv stack: our conv routes against Keras/TensorFlow and PyTorch on CPU.

Forward (inference) and a training step (forward + backward + plain SGD update) of the FIB-25
stack (depth 12, 32 features, FOV 33^3, channels-last, SAME, biases) at batch 1 and 4, for each
``ffn_jax`` conv route and the same architecture in Keras 3 on TensorFlow (oneDNN) and PyTorch
(default NCDHW and channels_last_3d). Each implementation runs in its own worker process (only its
framework imported, its own allocator and thread pools, as its users run it; idle while the
others run). Runs alternate between implementations (the order rotates every round), so a load
change on a shared machine hits all of them alike; each number is the median of ``--repeats``
runs after warm-up.

Memory: ffn_jax keeps freed host memory for reuse (``ffn_jax/host_memory.py``); peers run with
glibc's defaults unless ``--peer-malloc=retain`` gives them the same settings.

    python bench/conv_stack.py            # everything (~10 min on 2 cores)
    python bench/conv_stack.py --quick    # batch 4, onednn vs TF vs torch, < 2 min

Peers come from ``pip install -e .[compare]``; missing ones are reported and skipped (their
ratios are then null). Our float32 routes are compared with the float32 peers, our bf16 routes
(``onednn_bf16``) with the bf16 peers (``tf_bf16``: Keras ``mixed_bfloat16``; ``torch_bf16``:
channels_last_3d under CPU autocast), so both ratios come from one run. GFLOP/s counts 45.7
GFLOP per FOV forward (the 23 32->32 convs) and 3x that for a training step. Speed ratio = peer time / our time, > 1 means ours is faster. The last
line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

# Before jax is imported: keep XLA's 2-D convs (im2col_kz route) out of YNNPACK, which is slower
# here (PERFORMANCE.md). Affects only that route; the flag is reported in the output.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot"

LR = 1e-3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="batch 4, onednn + TF + torch, < 2 min")
  p.add_argument("--batches", default="1,4")
  p.add_argument("--routes", default="xla,im2col_kz,onednn,onednn_bf16",
                 help="ffn_jax conv routes, comma-separated")
  p.add_argument("--peers", default="tf,torch,torch_cl3d,tf_bf16,torch_bf16",
                 help="tf (Keras 3 on TensorFlow), torch (NCDHW), torch_cl3d (channels_last_3d); "
                      "bf16 peers, compared with our bf16 routes: tf_bf16 (Keras mixed_bfloat16), "
                      "torch_bf16 (channels_last_3d, CPU autocast)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2, help="untimed runs per implementation")
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  p.add_argument("--fov", type=int, default=33)
  p.add_argument("--depth", type=int, default=12)
  p.add_argument("--features", type=int, default=32)
  p.add_argument("--no-ynn-flag", action="store_true", help=f"do not add {_YNN_FLAG}")
  p.add_argument("--peer-malloc", choices=("default", "retain"), default="default",
                 help="peers run with glibc's default malloc (as their users run them) or with "
                      "the settings ffn_jax applies to itself (ffn_jax/host_memory.py)")
  p.add_argument("--our-malloc", choices=("retain", "default"), default="retain",
                 help="ffn_jax's own setting (default: retain, as on import) or glibc's default")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.quick:
    args.batches, args.routes, args.peers, args.warmup = "4", "onednn", "tf,torch", 1
  args.batches = [int(b) for b in args.batches.split(",")]
  args.routes = [r for r in args.routes.split(",") if r]
  args.peers = [r for r in args.peers.split(",") if r]
  return args


def gflop_forward(fov: int, depth: int, features: int) -> float:
  """GFLOP per FOV of the 2*depth-1 features->features 3^3 convs (45.7 for FIB-25)."""
  return 2 * fov**3 * 27 * features * features * (2 * depth - 1) / 1e9


def make_data(batch, fov, seed=0):
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  shape = (batch, fov, fov, fov, 1)
  image = rng.random(shape, dtype=np.float32)
  seed_logits = rng.normal(0.0, 1.0, shape).astype(np.float32)
  labels = (rng.random(shape) > 0.5).astype(np.float32)
  return image, seed_logits, labels


# ----------------------------------------------------------------------------------- ours (JAX)
def jax_runner(route, batch, args):
  import functools  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from ffn_jax import model as model_lib  # pylint: disable=import-outside-toplevel

  import numpy as np  # pylint: disable=import-outside-toplevel

  model = model_lib.FFN(depth=args.depth, features=args.features, conv_impl=route)
  shapes = jax.eval_shape(
      lambda: model_lib.init_params(model, jax.random.PRNGKey(0), (args.fov,) * 3))
  # The model's init scale, drawn with numpy: compiling jax.random's threefry takes >10 s here.
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0, 0.01, s.shape).astype(np.float32)), shapes)
  image, seed, labels = (jnp.asarray(a) for a in make_data(batch, args.fov))

  @jax.jit
  def forward(params, image, seed):
    return model.apply({"params": params}, image, seed)

  def loss_fn(params, image, seed, labels):
    logits = model.apply({"params": params}, image, seed)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(params, image, seed, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, image, seed, labels)
    return jax.tree.map(lambda p, g: p - LR * g, params, grads), loss

  state = {"params": params}

  def run_forward():
    forward(state["params"], image, seed).block_until_ready()

  def run_train():
    state["params"], loss = train_step(state["params"], image, seed, labels)
    loss.block_until_ready()

  return run_forward, run_train


# ------------------------------------------------------------------------ Keras 3 / TensorFlow
def tf_runner(batch, args, bf16: bool = False):
  """Keras 3 on TensorFlow; ``bf16``: the ``mixed_bfloat16`` policy (bf16 compute, float32
  variables), logits cast to float32 for the loss."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel
  from keras import layers  # pylint: disable=import-outside-toplevel

  if bf16:
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
  fov, f = args.fov, args.features
  image_in = keras.Input((fov, fov, fov, 1), batch_size=batch)
  seed_in = keras.Input((fov, fov, fov, 1), batch_size=batch)
  conv = lambda n, k=3, act=None: layers.Conv3D(n, k, padding="same", activation=act)
  x = layers.Concatenate()([image_in, seed_in])
  x = conv(f, act="relu")(x)
  x = conv(f)(x)
  for _ in range(1, args.depth):
    h = layers.ReLU()(x)
    h = conv(f, act="relu")(h)
    h = conv(f)(h)
    x = layers.Add()([x, h])
  out = layers.Add()([seed_in, conv(1, 1)(layers.ReLU()(x))])
  model = keras.Model([image_in, seed_in], out)
  optimizer = keras.optimizers.SGD(LR)
  image, seed, labels = (tf.constant(a) for a in make_data(batch, fov))

  @tf.function
  def forward(image, seed):
    return tf.cast(model([image, seed], training=False), tf.float32)

  @tf.function
  def train_step(image, seed, labels):
    with tf.GradientTape() as tape:
      logits = tf.cast(model([image, seed], training=True), tf.float32)
      loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels, logits))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  return (lambda: forward(image, seed).numpy()), (lambda: train_step(image, seed, labels).numpy())


# ------------------------------------------------------------------------------------ PyTorch
def torch_ffn(depth: int, features: int):
  """The FFN conv stack in PyTorch (NCDHW), the same architecture as ``ffn_jax.model.FFN``."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  f = features

  class TorchFFN(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv0_a = nn.Conv3d(2, f, 3, padding=1)
      self.conv0_b = nn.Conv3d(f, f, 3, padding=1)
      self.blocks = nn.ModuleList(
          nn.ModuleList([nn.Conv3d(f, f, 3, padding=1), nn.Conv3d(f, f, 3, padding=1)])
          for _ in range(1, depth))
      self.conv_lom = nn.Conv3d(f, 1, 1)

    def forward(self, image, seed):
      x = self.conv0_b(F.relu(self.conv0_a(torch.cat([image, seed], 1))))
      for conv_a, conv_b in self.blocks:
        x = x + conv_b(F.relu(conv_a(F.relu(x))))
      return seed + self.conv_lom(F.relu(x))

  return TorchFFN()


def torch_runner(batch, args, channels_last: bool, bf16: bool = False):
  """PyTorch; ``bf16``: CPU autocast to bfloat16 (float32 weights), logits float32 for the loss."""
  import contextlib  # pylint: disable=import-outside-toplevel

  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
  model = torch_ffn(args.depth, args.features).to(memory_format=fmt)
  to_ncdhw = lambda a: torch.from_numpy(a).permute(0, 4, 1, 2, 3).contiguous(memory_format=fmt)
  image, seed, labels = (to_ncdhw(a) for a in make_data(batch, args.fov))
  params = list(model.parameters())
  cast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16
          else contextlib.nullcontext)

  def run_forward():
    with torch.inference_mode(), cast():
      model(image, seed).float()

  def run_train():
    with cast():
      logits = model(image, seed).float()
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    loss.backward()
    # Plain SGD by hand, the same update as the others (torch.optim would import torch._dynamo).
    with torch.no_grad():
      torch._foreach_add_(params, [p.grad for p in params], alpha=-LR)  # pylint: disable=protected-access
    for p in params:
      p.grad = None

  return run_forward, run_train


# ----------------------------------------------------------------------------------- workers
PEERS = ("tf", "torch", "torch_cl3d", "tf_bf16", "torch_bf16")
BF16_PEERS = ("tf_bf16", "torch_bf16")


def build_runners(impl, batch, args):
  """(forward, train, note) for one implementation, with the thread count applied."""
  if impl in ("tf", "tf_bf16"):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    note = (f"tensorflow {tf.__version__} (oneDNN opts "
            f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default on')})")
    return (*tf_runner(batch, args, bf16=impl == "tf_bf16"), note)
  if impl in ("torch", "torch_cl3d", "torch_bf16"):
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(args.threads)
    note = f"torch {torch.__version__} (mkldnn {torch.backends.mkldnn.is_available()})"
    return (*torch_runner(batch, args, impl != "torch", bf16=impl == "torch_bf16"), note)
  import jax  # pylint: disable=import-outside-toplevel

  from ffn_jax import conv as conv_lib  # pylint: disable=import-outside-toplevel
  from ffn_jax import host_memory  # pylint: disable=import-outside-toplevel
  from ffn_jax.ops import onednn  # pylint: disable=import-outside-toplevel
  conv_lib.resolve(impl)  # ValueError where the route cannot run here
  note = (f"jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"host memory retention: {host_memory.status()}")
  if impl.startswith("onednn"):
    onednn.set_num_threads(args.threads)
    fov = args.fov
    note += (f"; oneDNN {onednn.version()}, impls fwd;bwd_data;bwd_weights = "
             f"{onednn.impl_info((batch, fov, fov, fov, args.features), args.features, bf16=impl.endswith('bf16'))}")
  return (*jax_runner(impl, batch, args), note)


def worker_main(args):
  """``--worker IMPL``: builds one implementation, warms it up, then runs 'forward'/'train' per
  line of stdin and answers each with one JSON line of wall and process CPU seconds."""
  # The protocol owns the original stdout; anything the frameworks print goes to stderr.
  proto = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)
  try:
    fwd, train, note = build_runners(args.worker, args.batch, args)
    runs = {"forward": fwd, "train": train}
    for run in runs.values():  # compile, allocate, let oneDNN/TF pick kernels
      for _ in range(args.warmup):
        run()
  except (ImportError, ValueError, RuntimeError) as e:
    proto.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
    return
  proto.write(json.dumps({"ready": True, "note": note, "pid": os.getpid()}) + "\n")
  for line in sys.stdin:
    mode = line.strip()
    if mode not in runs:
      break
    c, t = time.process_time(), time.perf_counter()
    runs[mode]()
    proto.write(json.dumps({"wall": time.perf_counter() - t, "cpu": time.process_time() - c})
                + "\n")


class Worker:
  """One implementation in its own process: only its framework is imported there, with that
  framework's own allocator and thread pools, as its users run it. Idle while others run."""

  def __init__(self, impl, batch, args, env):
    self.impl = impl
    self.log = tempfile.TemporaryFile(mode="w+")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--batch", str(batch),
           "--threads", str(args.threads), "--warmup", str(args.warmup), "--fov", str(args.fov),
           "--depth", str(args.depth), "--features", str(args.features)]
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self.log, text=True, env=env)
    self.hello = self._read()

  def _read(self):
    line = self.proc.stdout.readline()
    if not line:
      self.proc.wait()
      self.log.seek(0)
      tail = self.log.read()[-2000:]
      return {"error": f"worker exited with {self.proc.returncode}: ...{tail}"}
    return json.loads(line)

  def run(self, mode):
    self.proc.stdin.write(mode + "\n")
    self.proc.stdin.flush()
    reply = self._read()
    if "error" in reply:
      raise RuntimeError(f"{self.impl}: {reply['error']}")
    return reply["wall"], reply["cpu"]

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=60)
    self.log.close()


def worker_env(impl, args):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                  else []))
  if impl in PEERS:
    if args.peer_malloc == "retain":
      from ffn_jax import host_memory  # pylint: disable=import-outside-toplevel
      env.update(host_memory.GLIBC_ENV)
  else:
    if args.our_malloc == "default":
      env["FFN_JAX_RETAIN_MEMORY"] = "0"
    if not args.no_ynn_flag and _YNN_FLAG not in env.get("XLA_FLAGS", ""):
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + _YNN_FLAG).strip()
  return env


def time_alternating(workers, mode, repeats):
  """{name: ([wall s], [cpu s])}: each worker runs once per round, the order rotating."""
  names = list(workers)
  times = {n: ([], []) for n in names}
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      wall, cpu = workers[name].run(mode)
      times[name][0].append(wall)
      times[name][1].append(cpu)
  return times


def main():
  args = _parse()
  if args.worker:
    worker_main(args)
    return
  load_start = os.getloadavg()
  t_start = time.time()
  impls = [*args.routes, *args.peers]
  notes = [f"python {platform.python_version()}, threads {args.threads}, one process per "
           f"implementation; peers' malloc: {args.peer_malloc}, ours: {args.our_malloc}"]
  gf = gflop_forward(args.fov, args.depth, args.features)
  rows = []  # (batch, mode, name, median wall s, median cpu s)
  ours, peers = [], []
  for batch in args.batches:
    workers = {}
    try:
      for impl in impls:
        w = Worker(impl, batch, args, worker_env(impl, args))
        if "error" in w.hello:
          w.close()
          notes.append(f"{impl} skipped: {w.hello['error'][:300]}"
                       + ("; pip install -e .[compare]" if impl in PEERS else ""))
          continue
        workers[impl] = w
        note = f"{impl}: {w.hello['note']}"
        if note not in notes:
          notes.append(note)
      ours = [i for i in args.routes if i in workers]
      peers = [i for i in args.peers if i in workers]
      for mode in ("forward", "train"):
        for name, (ts, cs) in time_alternating(workers, mode, args.repeats).items():
          rows.append((batch, mode, name, statistics.median(ts), statistics.median(cs)))
    finally:
      for w in workers.values():
        w.close()

  def median(batch, mode, name, cpu=False):
    for b, m, n, t, c in rows:
      if (b, m, n) == (batch, mode, name):
        return c if cpu else t
    return None

  f32_routes = [r for r in ours if not r.endswith("bf16")]
  bf16_routes = [r for r in ours if r.endswith("bf16")]
  print("\n# FFN conv stack, ms per FOV (median of %d), GFLOP/s, speed vs the best peer of the "
        "same precision (>1: ours faster)" % args.repeats)
  for n in notes:
    print("#", n)
  header = (f"{'batch':>5} {'mode':>8} {'impl':>12} {'ms/FOV':>9} {'GFLOP/s':>8} {'vs peer':>8} "
            f"{'cpu ms/FOV':>10} {'cpu vs peer':>11}")
  print(header)
  print("-" * len(header))
  result = {}
  for batch in args.batches:
    for mode in ("forward", "train"):
      flops = gf * (3 if mode == "train" else 1)

      def best(group, cpu=False):
        times = {p: median(batch, mode, p, cpu) for p in group}
        return (min(times, key=times.get), times) if times else (None, times)

      f32_peers = [p for p in peers if p not in BF16_PEERS]
      bf16_peers = [p for p in peers if p in BF16_PEERS]
      for name in [*ours, *peers]:
        t = median(batch, mode, name) / batch
        c = median(batch, mode, name, cpu=True) / batch
        ratio = cpu_ratio = ""
        group = bf16_peers if name in bf16_routes else f32_peers
        (bp, pt), (bcp, pc) = best(group), best(group, cpu=True)
        if bp and name in ours:
          ratio = f"{pt[bp] / batch / t:.3f}"
          cpu_ratio = f"{pc[bcp] / batch / c:.3f}"
        print(f"{batch:>5} {mode:>8} {name:>12} {t * 1e3:>9.1f} {flops / t:>8.1f} {ratio:>8} "
              f"{c * 1e3:>10.1f} {cpu_ratio:>11}")

      def ratios(routes, group):
        """(our best route, its best peer, wall ratio, CPU-time ratio); None where missing."""
        mine = min(routes, key=lambda r: median(batch, mode, r)) if routes else None
        (bp, pt), (bcp, pc) = best(group), best(group, cpu=True)
        if not (mine and bp):
          return mine, bp, None, None
        return (mine, bp, round(pt[bp] / median(batch, mode, mine), 4),
                round(pc[bcp] / median(batch, mode, mine, cpu=True), 4))

      ours_best, best_peer, ratio, cpu_ratio = ratios(f32_routes, f32_peers)
      bf16_best, best_bf16_peer, bf16_ratio, bf16_cpu_ratio = ratios(bf16_routes, bf16_peers)
      key = "forward" if mode == "forward" else "train"
      result[f"{key}_b{batch}"] = {
          "best_route": ours_best,
          "ms_per_fov": {n: round(median(batch, mode, n) / batch * 1e3, 2) for n in [*ours, *peers]},
          "cpu_ms_per_fov": {n: round(median(batch, mode, n, cpu=True) / batch * 1e3, 2)
                             for n in [*ours, *peers]},
          "best_peer": best_peer,
          "ratio_vs_best_peer": ratio,
          "cpu_ratio_vs_best_peer": cpu_ratio,
          "best_bf16_route": bf16_best,
          "best_bf16_peer": best_bf16_peer,
          "bf16_ratio_vs_best_bf16_peer": bf16_ratio,
          "bf16_cpu_ratio_vs_best_bf16_peer": bf16_cpu_ratio,
      }
  load_end = os.getloadavg()
  print(f"# load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f}; "
        f"wall {time.time() - t_start:.0f} s")
  b4 = 4 if 4 in args.batches else args.batches[-1]
  summary = {
      "forward_ratio_vs_best_peer": result[f"forward_b{b4}"]["ratio_vs_best_peer"],
      "train_ratio_vs_best_peer": result[f"train_b{b4}"]["ratio_vs_best_peer"],
      "forward_cpu_ratio_vs_best_peer": result[f"forward_b{b4}"]["cpu_ratio_vs_best_peer"],
      "train_cpu_ratio_vs_best_peer": result[f"train_b{b4}"]["cpu_ratio_vs_best_peer"],
      "forward_bf16_ratio_vs_best_bf16_peer":
          result[f"forward_b{b4}"]["bf16_ratio_vs_best_bf16_peer"],
      "train_bf16_ratio_vs_best_bf16_peer": result[f"train_b{b4}"]["bf16_ratio_vs_best_bf16_peer"],
      "ratio_batch": b4,
      "peer_malloc": args.peer_malloc,
      "our_malloc": args.our_malloc,
      "load_avg_start_end": [round(load_start[0], 2), round(load_end[0], 2)],
      **result,
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
