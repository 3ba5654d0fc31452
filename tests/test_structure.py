"""The shape of the code that issue 28 asked for, held: no import cycles in ffn_jax, a ground
floor (``parallel``) that imports nothing from training, and a training loop that reads on one
screen."""
from __future__ import annotations

import ast
import inspect
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "ffn_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  """ffn_jax module -> the ffn_jax modules it imports anywhere in its file (module level,
  inside functions, under TYPE_CHECKING alike: a cycle through any of them is still a cycle)."""
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                    else node.module for a in node.names}
    graph[name] = {t for t in targets if t in modules and t != name}
  return graph


def _subpackage(name: str) -> str:
  """``ffn_jax.inference.canvas`` -> ``ffn_jax.inference``; top-level modules stay."""
  parts = name.split(".")
  return ".".join(parts[:2]) if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else name


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one node (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_the_cycle_finder_finds_a_cycle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules_or_subpackages():
  graph = import_graph()
  assert "ffn_jax.inference.job" in graph and "ffn_jax.conv" in graph["ffn_jax.model"]
  assert cycles(graph) == []
  packages: dict[str, set[str]] = {}
  for a, targets in graph.items():
    for b in targets:
      if _subpackage(a) != _subpackage(b):
        packages.setdefault(_subpackage(a), set()).add(_subpackage(b))
  assert cycles(packages) == []


def test_parallel_imports_nothing_from_training_or_inference():
  graph = import_graph()
  assert not {m for m in graph["ffn_jax.parallel"]
              if m.startswith(("ffn_jax.training", "ffn_jax.inference"))}


def test_the_training_loop_reads_on_one_screen():
  from ffn_jax.training import loop
  lines = inspect.getsource(loop._loop).splitlines()
  assert len(lines) <= 60, len(lines)
  assert len(inspect.signature(loop._loop).parameters) <= 3
