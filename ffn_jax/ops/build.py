"""Compiles the oneDNN conv extension on first use and caches the shared library.

Why compile on first use rather than at ``pip install`` time: the package must install from PyPI
wheels alone and still work where no compiler or oneDNN is present. A build step inside
``pip install`` either fails the whole install there or needs jaxlib and the 180 MB oneDNN wheel
as build requirements in an isolated environment (whose jaxlib need not match the runtime one,
and the FFI ABI is jaxlib's). Compiling lazily against the jaxlib and oneDNN that are actually
installed avoids both, and any failure only turns the ``onednn`` route off (the CPU default
falls back to ``im2col_kz``). One ``g++`` call takes ~10 s; the result is keyed by a hash of the
source, the compiler, jaxlib and oneDNN, so upgrades rebuild and everything else reuses it.

Cache directory: ``$FFN_JAX_CACHE`` or ``~/.cache/ffn_jax``. A lock file serialises builds, so
several MPI ranks starting together compile once; the library is written under a temporary
name and renamed into place, so a reader never sees a half-written file.

oneDNN is found, in order, under ``$FFN_JAX_ONEDNN_ROOT`` (``include/`` and ``lib/``), or in the
installed ``onednn-devel-cpu-gomp`` / ``onednn-cpu-gomp`` wheels (``pip install ffn_jax[onednn]``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile

log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
_CXXFLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fvisibility=hidden", "-w")


class BuildError(RuntimeError):
  """The extension could not be built; the message says why."""


@dataclasses.dataclass(frozen=True)
class OnednnInstall:
  include_dir: pathlib.Path
  library: pathlib.Path  # libdnnl.so.<major>, linked by its exact name


def cache_dir() -> pathlib.Path:
  root = os.environ.get("FFN_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ffn_jax")
  return pathlib.Path(root)


def _wheel_file(dist: str, suffix: str) -> pathlib.Path | None:
  try:
    files = importlib.metadata.distribution(dist).files or ()
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in files:
    if str(f).replace(os.sep, "/").endswith(suffix):
      path = pathlib.Path(f.locate()).resolve()
      if path.exists():
        return path
  return None


def find_onednn() -> OnednnInstall:
  """Locates oneDNN headers and library, or raises BuildError saying what is missing."""
  root = os.environ.get("FFN_JAX_ONEDNN_ROOT")
  if root:
    inc = pathlib.Path(root, "include")
    libs = sorted(pathlib.Path(root, "lib").glob("libdnnl.so.*"), key=lambda p: len(p.name))
    if not (inc / "oneapi/dnnl/dnnl.hpp").exists() or not libs:
      raise BuildError(f"FFN_JAX_ONEDNN_ROOT={root} has no include/oneapi/dnnl/dnnl.hpp "
                       "or lib/libdnnl.so.*")
    return OnednnInstall(inc, libs[0])
  header = _wheel_file("onednn-devel-cpu-gomp", "/oneapi/dnnl/dnnl.hpp")
  library = _wheel_file("onednn-cpu-gomp", "/libdnnl.so.3")
  if header is None or library is None:
    raise BuildError("oneDNN not installed: `pip install ffn_jax[onednn]` "
                     "(onednn-devel-cpu-gomp==2023.2.0)")
  return OnednnInstall(header.parents[2], library)


def _compiler() -> str:
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if not cxx:
    raise BuildError("no C++ compiler (g++) on PATH")
  return cxx


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  with open(path, "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def build_library() -> pathlib.Path:
  """Returns the path of the compiled extension, compiling it if the cache lacks it."""
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel

  onednn = find_onednn()
  cxx = _compiler()
  try:
    cxx_version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 check=True).stdout.splitlines()[0]
  except (OSError, subprocess.CalledProcessError, IndexError) as e:
    raise BuildError(f"C++ compiler {cxx} does not run: {e}") from e
  ffi_include = jax.ffi.include_dir()
  key = hashlib.sha256("\n".join([
      SOURCE.read_text(), cxx_version, jaxlib.__version__, str(onednn.library),
      str(onednn.library.stat().st_size), " ".join(_CXXFLAGS)]).encode()).hexdigest()[:16]
  out_dir = cache_dir()
  out_dir.mkdir(parents=True, exist_ok=True)
  target = out_dir / f"ffn_onednn_conv-{key}.so"
  if target.exists():
    return target
  with _locked(out_dir / f"ffn_onednn_conv-{key}.lock"):
    if target.exists():  # another process built it while we waited
      return target
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=target.name + ".", suffix=".tmp")
    os.close(fd)
    cmd = [cxx, *_CXXFLAGS, f"-I{ffi_include}", f"-I{onednn.include_dir}", str(SOURCE),
           "-o", tmp, str(onednn.library), f"-Wl,-rpath,{onednn.library.parent}"]
    log.info("compiling the oneDNN conv extension (once, ~10 s): %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      os.unlink(tmp)
      raise BuildError(f"g++ failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    os.chmod(tmp, 0o755)  # mkstemp made it 0600; other users of a shared cache may load it
    os.replace(tmp, target)
  return target
