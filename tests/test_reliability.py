"""Reliability: kill -9 and resume, SIGTERM, a dead or hung rank, damaged checkpoints, bad input.

Every case runs train.py / infer.py in a subprocess (under the venv's ``mpirun`` for the MPI
cases), exactly as a user would, and checks what the user sees: the exit code, one clear line,
no traceback, and that nothing already in the work directory was damaged.

All runs share one persistent XLA compilation cache, which turns a ~20 s tiny run into a few
seconds. It cannot change results: every resumed run is compared bit for bit (the parameter
fingerprint) with an uninterrupted one.

Kills land at a random step; the seed is in every failure message (``FFN_RELIABILITY_SEED=N``
replays it).
"""
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, cli_env, mpirun, read_metrics

pytestmark = pytest.mark.slow  # train.py / mpirun runs: the full tier only

STEPS = ("--config.max_steps=30",)  # every training run here trains the tiny model to step 30


# -- running train.py ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env():
  return cli_env()  # with the session's XLA compilation cache (conftest)


@pytest.fixture
def rng():
  seed = int(os.environ.get("FFN_RELIABILITY_SEED", random.SystemRandom().randrange(10**6)))
  r = random.Random(seed)
  r.seed_text = f"FFN_RELIABILITY_SEED={seed}"
  return r


def _train_cmd(workdir, overrides, ranks=None, script="train.py", config="configs/tiny.py"):
  cmd = [sys.executable, str(REPO / script), "--config", str(REPO / config),
         "--workdir", str(workdir), *overrides]
  if ranks:
    cmd = [mpirun(), "-n", str(ranks), *cmd]
  return cmd


def _run(env, workdir, *overrides, ranks=None, timeout=240, **kw):
  return subprocess.run(_train_cmd(workdir, overrides, ranks, **kw), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


class _Job:
  """A train.py (or mpirun) process in the background; its output goes to files."""

  def __init__(self, env, workdir, *overrides, ranks=None, **kw):
    self.workdir = Path(workdir)
    self.workdir.parent.mkdir(parents=True, exist_ok=True)
    self._out = open(f"{workdir}.stdout", "w+")
    self._err = open(f"{workdir}.stderr", "w+")
    self.proc = subprocess.Popen(_train_cmd(workdir, overrides, ranks, **kw), cwd=REPO, env=env,
                                 stdout=self._out, stderr=self._err, text=True)
    self.pid = self.proc.pid

  def output(self) -> tuple[str, str]:
    self._out.seek(0)
    self._err.seek(0)
    return self._out.read(), self._err.read()

  def wait_for(self, condition, what: str, timeout=180):
    """Polls ``condition()`` until truthy; fails if the process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      value = condition()
      if value:
        return value
      if self.proc.poll() is not None:
        pytest.fail(f"process ended (rc {self.proc.returncode}) before {what}:\n"
                    + "\n".join(self.output()))
      time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}:\n" + "\n".join(self.output()))

  def wait(self, timeout) -> float:
    """Seconds until the process ended (fails past ``timeout``)."""
    t0 = time.monotonic()
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      pytest.fail(f"still running {timeout} s later:\n" + "\n".join(self.output()))
    return time.monotonic() - t0

  def cleanup(self):
    for pid in [*_descendants(self.pid), self.pid]:
      _kill(pid, signal.SIGKILL)
    self.proc.wait(timeout=30)
    self._out.close()
    self._err.close()


@pytest.fixture
def jobs():
  started = []
  yield lambda *a, **kw: started.append(_Job(*a, **kw)) or started[-1]
  for job in started:
    job.cleanup()


def _kill(pid, sig):
  try:
    os.kill(pid, sig)
  except ProcessLookupError:
    pass


def _children() -> dict:
  children = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, ValueError, IndexError):
        continue
      children.setdefault(ppid, []).append(int(entry))
  return children


def _descendants(pid) -> list:
  children, out, stack = _children(), [], [pid]
  while stack:
    for child in children.get(stack.pop(), []):
      out.append(child)
      stack.append(child)
  return out


def _rank_pids(mpirun_pid) -> dict:
  """{rank: pid} of the train.py ranks under mpirun (hydra: mpirun -> proxy -> ranks)."""
  ranks = {}
  for pid in _descendants(mpirun_pid):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if b"train.py" not in f.read():
          continue
      with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
      continue
    if b"PMI_RANK" in env:
      ranks[int(env[b"PMI_RANK"])] = pid
  return ranks


def _alive(pid) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def _gone(pids, timeout=10) -> bool:
  """True once none of ``pids`` runs any more (a killed process takes a moment to exit)."""
  deadline = time.monotonic() + timeout
  while any(_alive(pid) for pid in pids):
    if time.monotonic() > deadline:
      return False
    time.sleep(0.1)
  return True


def _logged_step(workdir) -> int:
  """The last step in metrics.jsonl (0 if none); tolerates a half-written last line."""
  try:
    with open(Path(workdir) / "metrics.jsonl") as f:
      steps = re.findall(r'"step": (\d+)', f.read())
  except FileNotFoundError:
    return 0
  return int(steps[-1]) if steps else 0


def _steps(workdir) -> list:
  folder = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) \
      if folder.exists() else []


def _final(workdir) -> dict:
  record = read_metrics(workdir)[-1]
  assert record.get("final") and record["step"] == 30, record
  return record


def _digest(workdir) -> dict:
  """{relative path: sha256} of the checkpoints and metrics: proves nothing was touched."""
  root = Path(workdir)
  files = [p for p in (root / "checkpoints").rglob("*") if p.is_file()]
  files += [root / "metrics.jsonl"]
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _one_line_error(proc, *needles, code=2):
  """Exit ``code``, one line on stderr starting 'error:', containing every needle."""
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == code, proc.stdout + proc.stderr
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  for needle in needles:
    assert needle in lines[0], (needle, proc.stderr)


# -- reference runs (uninterrupted) --------------------------------------------------------------
@pytest.fixture
def reference(tiny_reference):
  """30 uninterrupted steps on one process; checkpoints at 10, 20, 30 (shared, conftest)."""
  assert _steps(tiny_reference[0]) == [10, 20, 30]
  return tiny_reference


@pytest.fixture
def reference_2ranks(tiny_reference_2ranks):
  """The same on two ranks (shared, conftest)."""
  assert len(set(_final(tiny_reference_2ranks[0])["rank_fingerprints"])) == 1
  return tiny_reference_2ranks


# -- kill -9 and resume --------------------------------------------------------------------------
def test_kill9_at_random_step_then_same_command_resumes_exactly(env, jobs, rng, reference,
                                                                tmp_path):
  work = tmp_path / "w"
  args = (*STEPS, "--config.checkpoint_every=3", "--config.log_every=1")
  target = rng.randrange(4, 16)
  job = jobs(env, work, *args)
  job.wait_for(lambda: _logged_step(work) >= target, f"step {target} ({rng.seed_text})")
  time.sleep(rng.uniform(0, 0.2))
  job.proc.send_signal(signal.SIGKILL)
  job.wait(30)
  assert job.proc.returncode == -signal.SIGKILL, rng.seed_text
  killed_at = _logged_step(work)
  assert killed_at < 30, f"finished before the kill ({rng.seed_text})"

  again = _run(env, work, *args)
  assert again.returncode == 0, again.stderr + rng.seed_text
  assert re.search(r"resumed from .* at step (\d+)", again.stdout), again.stdout
  assert "Traceback" not in again.stderr, again.stderr
  assert _final(work)["params_fingerprint"] == reference[1], rng.seed_text


def test_rank_killed_others_exit_fast_and_rerun_resumes_exactly(env, jobs, rng,
                                                                reference_2ranks, tmp_path):
  """kill -9 of one of two ranks (rank 0 may be writing a checkpoint): the other rank is ended
  by the launcher within seconds with a message naming the dead process; rerunning the same
  command resumes from the last complete checkpoint and ends with the same parameters."""
  work = tmp_path / "w"
  args = (*STEPS, "--config.checkpoint_every=3", "--config.log_every=1")
  victim, target = rng.randrange(2), rng.randrange(4, 16)
  job = jobs(env, work, *args, ranks=2)
  ranks = job.wait_for(lambda: len(_rank_pids(job.pid)) == 2 and _rank_pids(job.pid),
                       "both ranks started")
  job.wait_for(lambda: _logged_step(work) >= target, f"step {target} ({rng.seed_text})")
  time.sleep(rng.uniform(0, 0.2))
  os.kill(ranks[victim], signal.SIGKILL)
  elapsed = job.wait(30)
  out, err = job.output()
  assert elapsed < 30 and job.proc.returncode != 0, rng.seed_text
  assert f"PID {ranks[victim]}" in out + err and "signal 9" in out + err, out + err
  assert _gone(ranks.values()), "a rank outlived mpirun"
  assert _logged_step(work) < 30, f"finished before the kill ({rng.seed_text})"

  again = _run(env, work, *args, ranks=2)
  assert again.returncode == 0, again.stderr + rng.seed_text
  final = _final(work)
  assert final["rank_fingerprints"] == [reference_2ranks[1]] * 2, rng.seed_text


def test_hung_rank_is_detected_and_all_ranks_end(env, jobs, tmp_path):
  """A rank that stops (SIGSTOP: as if stuck in I/O) leaves the other blocked in an allreduce;
  the step watchdog ends the job after step_timeout_s with a message."""
  work = tmp_path / "w"
  job = jobs(env, work, "--config.max_steps=100000", "--config.log_every=1",
             "--config.checkpoint_every=100000", "--config.step_timeout_s=8", ranks=2)
  ranks = job.wait_for(lambda: len(_rank_pids(job.pid)) == 2 and _rank_pids(job.pid),
                       "both ranks started")
  job.wait_for(lambda: _logged_step(work) >= 3, "step 3")
  os.kill(ranks[1], signal.SIGSTOP)
  elapsed = job.wait(8 + 30)
  _, err = job.output()
  assert job.proc.returncode != 0
  assert "[rank 0] error: no training progress for 8 s (step_timeout_s) after step" in err, err
  assert elapsed >= 4, elapsed  # it waited for the timeout (from the last step before the stop)
  assert _gone(ranks.values()), "a rank outlived mpirun"


def test_half_written_and_truncated_checkpoints_are_never_restored(env, reference, tmp_path):
  """A leftover orbax temp dir (a save killed before its rename) is ignored and removed; a
  truncated file in the newest step makes it fall back to the previous step, saying so, and
  the run still ends with the uninterrupted parameters. A half-written metrics line is dropped."""
  work = tmp_path / "w"
  shutil.copytree(reference[0], work)
  ckpts = work / "checkpoints"
  shutil.copytree(ckpts / "30", ckpts / "40.orbax-checkpoint-tmp-1700000000")
  (ckpts / "40.orbax-checkpoint-tmp-1700000000" / "commit_success.txt").unlink()
  biggest = max((p for p in (ckpts / "30" / "state").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  os.truncate(biggest, biggest.stat().st_size // 2)
  with open(work / "metrics.jsonl", "a") as f:
    f.write('{"step": 31, "lo')

  proc = _run(env, work, *STEPS)
  assert proc.returncode == 0, proc.stderr
  assert "warning: checkpoint step 30 is unreadable" in proc.stdout, proc.stdout
  assert "falling back to the previous one" in proc.stdout
  assert f"moved unreadable checkpoint step 30 to {work}/unreadable_checkpoints/30" in proc.stdout
  assert "at step 20" in proc.stdout and "Traceback" not in proc.stderr, proc.stderr
  assert _final(work)["params_fingerprint"] == reference[1]
  assert _steps(work) == [10, 20, 30]  # 30 written again, complete
  assert not list(ckpts.glob("*orbax-checkpoint-tmp*"))
  assert (work / "unreadable_checkpoints" / "30" / "state").is_dir()  # kept for inspection


def test_no_readable_checkpoint_is_an_error_and_nothing_is_moved(env, reference, tmp_path):
  work = tmp_path / "w"
  shutil.copytree(reference[0], work)
  for step in (10, 20, 30):
    manifest = work / "checkpoints" / str(step) / "state" / "manifest.ocdbt"
    os.truncate(manifest, 3)
  before = _digest(work)
  proc = _run(env, work, *STEPS)
  _one_line_error(proc, "no readable checkpoint", "tried steps [30, 20, 10]", code=1)
  assert _digest(work) == before


# -- SIGTERM (preemption) ------------------------------------------------------------------------
def test_sigterm_saves_exits_75_and_rerun_resumes_exactly(env, jobs, reference, tmp_path):
  work = tmp_path / "w"
  args = (*STEPS, "--config.log_every=1")
  job = jobs(env, work, *args)
  job.wait_for(lambda: _logged_step(work) >= 5, "step 5")
  job.proc.send_signal(signal.SIGTERM)
  elapsed = job.wait(60)
  _, err = job.output()
  assert job.proc.returncode == 75, err
  saved = re.search(r"SIGTERM: saved checkpoint at step (\d+) in \S+; rerun the same command to "
                    r"continue", err)
  assert saved and int(saved.group(1)) in _steps(work), err
  assert elapsed < 30 and "Traceback" not in err
  again = _run(env, work, *args)
  assert again.returncode == 0 and f"at step {saved.group(1)}" in again.stdout, again.stderr
  assert _final(work)["params_fingerprint"] == reference[1]


def test_sigterm_save_slower_than_grace_exits_anyway(env, jobs, tmp_path):
  work = tmp_path / "w"
  job = jobs(env, work, "--config.max_steps=100000", "--config.log_every=1",
             "--config.checkpoint_every=100000", "--config.preemption_grace_s=2",
             "--config.debug.preempt_save_delay_s=300")
  job.wait_for(lambda: _logged_step(work) >= 3, "step 3")
  job.proc.send_signal(signal.SIGTERM)
  elapsed = job.wait(30)
  _, err = job.output()
  assert job.proc.returncode == 75, err
  assert ("SIGTERM: the checkpoint was not saved within preemption_grace_s=2 s; exiting without "
          "it (rerun the same command to continue from the last complete checkpoint)") in err
  assert 1.5 < elapsed < 20, elapsed
  assert _steps(work) == []


def test_sigterm_to_mpirun_saves_on_all_ranks_exits_75_and_resumes(env, jobs, reference_2ranks,
                                                                   tmp_path):
  work = tmp_path / "w"
  args = (*STEPS, "--config.log_every=1")
  job = jobs(env, work, *args, ranks=2)
  job.wait_for(lambda: _logged_step(work) >= 5, "step 5")
  job.proc.send_signal(signal.SIGTERM)  # hydra forwards it to every rank
  job.wait(60)
  _, err = job.output()
  assert job.proc.returncode == 75, err
  saved = re.search(r"SIGTERM: saved checkpoint at step (\d+)", err)
  assert saved and int(saved.group(1)) in _steps(work), err
  again = _run(env, work, *args, ranks=2)
  assert again.returncode == 0, again.stderr
  assert _final(work)["rank_fingerprints"] == [reference_2ranks[1]] * 2


# -- bad input: one line, exit 2, nothing damaged ------------------------------------------------
@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
  from ffn_jax.data import synthetic
  from ffn_jax.data.volumes import write_zarr
  root = tmp_path_factory.mktemp("volumes")
  image, labels = synthetic.make_volume((24, 40, 40), n_objects=10, seed=0)
  write_zarr(str(root / "image.zarr"), image)
  write_zarr(str(root / "labels.zarr"), labels)
  write_zarr(str(root / "labels_float.zarr"), labels.astype(np.float32))
  write_zarr(str(root / "labels_short.zarr"), labels[:, :, :39])
  write_zarr(str(root / "labels_empty.zarr"), np.zeros_like(labels))
  write_zarr(str(root / "image_small.zarr"), image[:8, :12, :12])
  write_zarr(str(root / "labels_small.zarr"), labels[:8, :12, :12])
  write_zarr(str(root / "labels_corrupt.zarr"), labels)
  chunk = root / "labels_corrupt.zarr" / "0.0.0"
  os.truncate(chunk, chunk.stat().st_size // 2)
  return root


def _data(volumes, image, labels):
  return (f"--config.data.image={volumes / image}", f"--config.data.labels={volumes / labels}")


BAD_INPUTS = {
    "missing volume": (lambda v: _data(v, "nope.zarr", "labels.zarr"),
                       ["volume not found", "nope.zarr"]),
    "shapes differ": (lambda v: _data(v, "image.zarr", "labels_short.zarr"),
                      ["has shape (24, 40, 40) but labels", "have shape (24, 40, 39)"]),
    "float labels": (lambda v: _data(v, "image.zarr", "labels_float.zarr"),
                     ["dtype float32", "labels must be integer object IDs"]),
    "volume smaller than FOV + margins": (
        lambda v: _data(v, "image_small.zarr", "labels_small.zarr"),
        ["training volume of shape (8, 12, 12) is smaller than one training example"]),
    "all-background labels": (lambda v: _data(v, "image.zarr", "labels_empty.zarr"),
                              ["no training coordinates"]),
    "corrupt volume chunk": (lambda v: _data(v, "image.zarr", "labels_corrupt.zarr"),
                             ["cannot read box start (0, 0, 0) size (24, 40, 40)",
                              "labels_corrupt.zarr"]),
    "box outside the volume": (
        lambda v: [*_data(v, "image.zarr", "labels.zarr"), "--config.data.box_start_zyx=(30,0,0)"],
        ["data.box_start_zyx (30, 0, 0) lies outside the volumes of shape (24, 40, 40)"]),
    "unknown config key": (lambda v: ["--config.model.featurez=4"],
                           ["unknown config key: 'featurez'", 'Did you mean "features"']),
    "wrong value type": (lambda v: ["--config.max_steps=many"],
                         ["bad flag value", "max_steps"]),
    "wrong tuple": (lambda v: ["--config.model.fov_size_zyx=(9,9)"],
                    ["config.model.fov_size_zyx must be 3 integers >= 1"]),
    "zero interval": (lambda v: ["--config.checkpoint_every=0"],
                      ["config.checkpoint_every must be an integer >= 1, got 0"]),
    "checkpoint of another model": (
        lambda v: ["--config.model.features=4"],
        ["checkpoint step 30 was trained with a different model",
         "features 8 (checkpoint) vs 4 (config)", "use the config it was trained with"]),
    "checkpoint of another optimizer": (
        lambda v: ["--config.optim.name=sgd"], ["optim.name='adam', not 'sgd'"]),
    "checkpoint of another global batch": (
        lambda v: ["--config.batch_size=4"],
        ["checkpoint step 30 was trained with a global batch of 2, this run has 4"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_damages_nothing(case, env, volumes, reference,
                                                          tmp_path):
  work = tmp_path / "w"
  shutil.copytree(reference[0], work)
  before = _digest(work)
  overrides, needles = BAD_INPUTS[case]
  proc = _run(env, work, *STEPS, *overrides(volumes))
  _one_line_error(proc, *needles)
  assert _digest(work) == before
  assert not (work / "unreadable_checkpoints").exists()


def test_unwritable_workdir_is_one_line_exit_2(env, tmp_path):
  # Tests run as root, which ignores permissions: a workdir below a regular file cannot exist.
  blocker = tmp_path / "a_file"
  blocker.write_text("keep me\n")
  proc = _run(env, blocker / "w", *STEPS)
  _one_line_error(proc, f"cannot write to workdir {blocker}/w: Not a directory")
  assert blocker.read_text() == "keep me\n"


def test_resume_with_another_rank_count_is_refused(env, reference, tmp_path):
  """A 1-rank run's workdir resumed by 2 ranks (same global batch): refused, nothing changed."""
  work = tmp_path / "w"
  shutil.copytree(reference[0], work)
  before = _digest(work)
  proc = _run(env, work, "--config.max_steps=40", "--config.global_batch=2", ranks=2)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert ("checkpoint step 30 was written by 1 ranks; rerun with the same rank count (now 2)"
          in proc.stderr), proc.stderr
  assert "Traceback" not in proc.stderr
  assert _digest(work) == before


def test_global_batch_must_split_over_ranks(env, tmp_path):
  proc = _run(env, tmp_path / "bad", "--config.global_batch=3", ranks=2)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert ("error: global_batch=3 cannot be split evenly over 2 rank(s) x 1 local device(s) = 2; "
          "use a multiple of 2 or another rank count") in proc.stderr, proc.stderr
  assert "Traceback" not in proc.stderr
  # Divisible: each device takes global_batch / (ranks x devices); batch_size is ignored.
  proc = _run(env, tmp_path / "good", "--config.global_batch=4", "--config.batch_size=3",
              "--config.max_steps=2", ranks=2)
  assert proc.returncode == 0, proc.stderr
  assert read_metrics(tmp_path / "good")[-1]["global_batch"] == 4


# -- no unsafe deserialization -------------------------------------------------------------------
UNSAFE = [
    (re.compile(r"\b(c?pickle|cloudpickle|dill|marshal|shelve)\b"), "pickle-like deserializer"),
    (re.compile(r"(?<![\w.])(eval|exec)\s*\("), "eval/exec"),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
    (re.compile(r"\byaml\.(unsafe_)?load\s*\("), "yaml.load"),
    (re.compile(r"\btorch\.load\s*\("), "torch.load"),
]


def test_no_unsafe_deserialization_in_the_package():
  sources = [*sorted((REPO / "ffn_jax").rglob("*.py")), REPO / "train.py", REPO / "infer.py"]
  problems = []
  for path in sources:
    if not path.exists():
      continue
    text = path.read_text()
    for pattern, what in UNSAFE:
      for m in pattern.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        problems.append(f"{path.relative_to(REPO)}:{line}: {what}")
    for m in re.finditer(r"\b(np|numpy|jnp)\.load\s*\(", text):
      if "allow_pickle=False" not in _call_arguments(text, m.end()):
        line = text.count("\n", 0, m.start()) + 1
        problems.append(f"{path.relative_to(REPO)}:{line}: np.load without allow_pickle=False")
  assert not problems, "\n".join(problems)


def _call_arguments(text: str, start: int) -> str:
  """The text from ``start`` (just after an opening parenthesis) to its closing one."""
  depth = 1
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return text[start:i]
  return text[start:]


# -- inference: kill -9 and resume, bad bounding box ---------------------------------------------
@pytest.fixture(scope="module")
def infer_assets(tmp_path_factory):
  """A 48^3 image and a depth-2 FFN whose last bias makes every seed one FOV-sized segment
  (deterministic and quick: ~100 FOV calls)."""
  import jax
  from scipy import ndimage
  from ffn_jax import checkpoint, model
  from ffn_jax.data.volumes import write_zarr
  root = tmp_path_factory.mktemp("infer")
  noise = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=(48, 48, 48)), 2.0)
  write_zarr(str(root / "image.zarr"),
             np.clip(128 + noise / noise.std() * 30, 0, 255).astype(np.uint8))
  params = model.init_params(model.FFN(depth=2, features=4), jax.random.PRNGKey(0), (9, 9, 9))
  params = jax.tree_util.tree_map(np.asarray, params)
  params["conv_lom"]["bias"] = np.array([3.5], np.float32)
  checkpoint.save_params(str(root / "ckpt"), params, meta={
      "model": {"depth": 2, "features": 4, "fov_size_zyx": [9, 9, 9], "deltas_zyx": [3, 3, 3]},
      "image_mean": 128.0, "image_stddev": 33.0})
  return root


def _infer_args(assets, *extra):
  return (f"--config.checkpoint={assets / 'ckpt'}", f"--config.image={assets / 'image.zarr'}",
          "--config.image_mean=-1", "--config.image_stddev=-1",
          "--config.inference.min_segment_size=100", "--config.progress_interval_s=-1",
          "--config.checkpoint_interval_s=0", *extra)


def _segmentation(workdir):
  from ffn_jax.data.volumes import open_volume
  return open_volume(str(Path(workdir) / "segmentation.zarr")).read()


INFER = {"script": "infer.py", "config": "configs/fib25_infer.py"}


def test_infer_kill9_then_same_command_resumes_to_the_same_segmentation(env, jobs, rng,
                                                                       infer_assets, tmp_path):
  args = _infer_args(infer_assets)
  ref = _run(env, tmp_path / "ref", *args, **INFER)
  assert ref.returncode == 0, ref.stderr
  work = tmp_path / "killed"
  job = jobs(env, work, *args, **INFER)
  job.wait_for(lambda: (work / "inference_state.npz").exists(), "the first inference state")
  time.sleep(rng.uniform(0, 0.2))
  job.proc.send_signal(signal.SIGKILL)
  job.wait(30)
  # The state file goes away only when the job is done.
  assert (work / "inference_state.npz").exists(), f"finished before the kill ({rng.seed_text})"
  again = _run(env, work, *args, **INFER)
  assert again.returncode == 0, again.stderr + rng.seed_text
  assert "Traceback" not in again.stderr
  with open(work / "counters.json") as f:
    assert json.load(f)["resumed"] == 1, rng.seed_text
  np.testing.assert_array_equal(_segmentation(work), _segmentation(tmp_path / "ref"),
                                err_msg=rng.seed_text)


def test_infer_bbox_outside_volume_is_one_line_exit_2(env, infer_assets, tmp_path):
  proc = _run(env, tmp_path / "w", *_infer_args(infer_assets, "--config.bbox_start_zyx=(40,0,0)",
                                                "--config.bbox_size_zyx=(16,16,16)"), **INFER)
  _one_line_error(proc, "outside the volume")
  assert not (tmp_path / "w" / "segmentation.zarr").exists()
