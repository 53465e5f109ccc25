"""The package's import graph, built from the source with ``ast``: imports run one way.

- no cycle between modules;
- no cycle between folders (each subpackage of ``sh2_jax`` is one node; the package's own
  top-level modules are a node each, since everything builds on ``config.py`` and the modules;
  a folder's ``__main__.py``, what ``python -m`` runs, is an entry point like the commands in
  ``sh2_jax/cli/`` and is left out);
- nothing in the library imports a top-level ``configs`` (the configs live in
  ``sh2_jax/configs``);
- no switch on a layer-type string (``op == "LI"``, ``op in ("MR", "LI")``) outside
  ``config.py``, ``dispatch.py``, ``convert/`` and ``blocks.py`` (the one factory mapping a
  layer type to its classes).
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "sh2_jax"
OPS = {"SE", "MR", "LI", "MHA"}
SWITCH_ALLOWED = ("sh2_jax/config.py", "sh2_jax/dispatch.py", "sh2_jax/convert/",
                  "sh2_jax/blocks.py")


def _modules() -> dict[str, str]:
  """Module name -> file path for every .py file under sh2_jax/."""
  out = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
  """The modules (of ``modules``, or external top-level names) that ``name`` imports."""
  tree = ast.parse(open(path).read(), path)
  is_pkg = path.endswith("__init__.py")
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
        base = ".".join(parts + ([base] if base else []))
      # ``from pkg import sub`` imports the submodule pkg.sub when there is one.
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    else:
      continue
    for t in targets:
      while t not in modules and "." in t:
        t = t.rsplit(".", 1)[0]
      out.add(t)
  out.discard(name)
  return out


def _graph():
  modules = _modules()
  return modules, {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of ``graph`` (restricted to its own nodes), or None."""
  state, stack = {}, []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if m not in graph:
        continue
      if state.get(m) == 1:
        return stack[stack.index(m):] + [m]
      if m not in state:
        found = visit(m)
        if found:
          return found
    stack.pop()
    state[n] = 2
    return None

  for n in sorted(graph):
    if n not in state:
      found = visit(n)
      if found:
        return found
  return None


def _folder(module: str) -> str:
  """The folder node of a module: ``sh2_jax.ops.fir`` -> ``sh2_jax.ops``; a top-level module
  (``sh2_jax.model``) is its own node; the package ``sh2_jax`` (its __init__) too."""
  parts = module.split(".")
  return ".".join(parts[:2])


def test_no_module_cycle():
  _, graph = _graph()
  assert _cycle(graph) is None, f"import cycle between modules: {' -> '.join(_cycle(graph))}"


def test_no_folder_cycle():
  modules, graph = _graph()
  folders: dict[str, set[str]] = {}
  for m, deps in graph.items():
    if m == PACKAGE or m.endswith(".__main__"):  # the interface and the entry points
      continue
    node = folders.setdefault(_folder(m), set())
    node.update(_folder(d) for d in deps if d in modules and d != PACKAGE
                and _folder(d) != _folder(m))
  cycle = _cycle(folders)
  assert cycle is None, f"import cycle between folders: {' -> '.join(cycle)}"


def test_library_never_imports_top_level_configs():
  _, graph = _graph()
  bad = sorted(m for m, deps in graph.items() if any(d == "configs" or d.startswith("configs.")
                                                      for d in deps))
  assert not bad, f"modules importing the top-level configs package: {bad}"


def test_no_layer_type_switch_outside_the_allowed_files():
  modules, _ = _graph()
  bad = []
  for name, path in modules.items():
    rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
    if rel.startswith(SWITCH_ALLOWED):
      continue
    for node in ast.walk(ast.parse(open(path).read(), path)):
      if not isinstance(node, ast.Compare):
        continue
      for side in [node.left, *node.comparators]:
        consts = ([side] if isinstance(side, ast.Constant) else
                  list(side.elts) if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [])
        if any(isinstance(c, ast.Constant) and c.value in OPS for c in consts):
          bad.append(f"{rel}:{node.lineno}")
  assert not bad, f"layer-type string switches outside {SWITCH_ALLOWED}: {bad}"


def test_the_graph_sees_known_edges():
  """The parser itself: it finds edges that certainly exist."""
  _, graph = _graph()
  assert "sh2_jax.ops.fir" in graph["sh2_jax.hyena"]
  assert "sh2_jax.model" in graph["sh2_jax.inference.cache"]
  assert "sh2_jax.parallel.halo" in graph["sh2_jax.hyena"]
  assert "sh2_jax.kernels.fir_layout" in graph["sh2_jax.kernels.fir_conv_bwd"]


def test_pip_install_ships_one_top_level_package():
  """``pip install .`` ships what pyproject's package find selects (setuptools: folders with an
  ``__init__.py`` whose dotted name matches an ``include`` pattern): only ``sh2_jax``."""
  import fnmatch
  import tomllib
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    find = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]
  packages = []
  for dirpath, dirnames, files in os.walk(ROOT):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    name = os.path.relpath(dirpath, ROOT).replace(os.sep, ".")
    if "__init__.py" in files and any(fnmatch.fnmatchcase(name, pat) for pat in find["include"]):
      packages.append(name)
  assert {p.split(".")[0] for p in packages} == {PACKAGE}, packages
  assert "sh2_jax.configs" in packages and "sh2_jax.kernels" in packages
  assert not os.path.exists(os.path.join(ROOT, "configs", "__init__.py"))  # a plain folder


def test_library_never_imports_the_commands():
  """``sh2_jax/cli/`` sits on top: only entry points (``__main__``) import it."""
  _, graph = _graph()
  bad = sorted(m for m, deps in graph.items()
               if not m.startswith("sh2_jax.cli") and not m.endswith(".__main__")
               and any(d.startswith("sh2_jax.cli") for d in deps))
  assert not bad, f"library modules importing sh2_jax.cli: {bad}"
  assert "sh2_jax.cli.convert" in graph["sh2_jax.convert.__main__"]
