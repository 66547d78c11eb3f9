"""The package's import graph: layers import downward, no private name crosses a module, no torch when planning.

Every module under ``vramplan/`` is parsed with :mod:`ast` (nothing is imported to build the
graph). An edge ``a -> b`` is any import of ``b`` written in ``a``: at module level or inside a
function (a *lazy* import counts: it runs as soon as the function does). ``from p import x``
points at the submodule ``p.x`` when there is one, else at ``p``; importing a module of a
sub-package from outside it also points at the sub-package's ``__init__`` (which runs first).
Imports under ``if TYPE_CHECKING:`` never run and are left out of the graph (they still may not
name a private name).

The rules:

1. **No cycles among the planning modules.** The planning modules are every module except the
   edge -- ``vramplan/__init__.py`` (the Python API), ``vramplan/__main__.py`` and
   ``vramplan/cli.py`` -- and the optional heavy layers ``vramplan.dryrun``, ``vramplan.runtime``,
   ``vramplan.calibration``, ``vramplan.integrations`` and ``vramplan.measurements``, which
   need torch/transformers/peft or recorded data and sit *above* the planner. Within the
   planning modules the graph, lazy imports included, is acyclic: the planner's layers
   (:mod:`vramplan.planner`: checks -> estimating -> limits -> search -> techniques ->
   fitting, then ``vramplan.matrix``) import only downward.
   A planning module never imports a heavy layer, not even lazily: a lazy import of a heavy
   layer is allowed only where it points upward from the edge (the CLI and the API's
   ``vramplan.dryrun``/``VramplanCallback``/``from_model`` load them on use) or from another
   heavy layer. Cycles inside the heavy layers are listed in :data:`KNOWN_HEAVY_CYCLES`, each
   with why it is not fixed yet; a new one fails, and so does a listed one that is gone (so
   the list stays true).
2. **No private name imported across modules**: ``from m import _x`` (``_x`` not a dunder)
   in a module other than ``m``, or ``mod._x`` through an imported module. A private *module*
   (``vramplan._data``) is private to the package, not to a module: its public names may be
   imported. Known violations in the heavy layers other sessions are editing are listed in
   :data:`KNOWN_PRIVATE_IMPORTS`, with the same both-ways check.
3. **The numpy planning path imports no torch, transformers or peft**: in a fresh interpreter,
   ``import vramplan``, ``vramplan.estimate(...)``, ``vramplan.fit(...)`` and
   ``vramplan.feasibility_matrix(...)`` leave none of them in ``sys.modules``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "vramplan"
EDGE = {"vramplan", "vramplan.__main__", "vramplan.cli"}
HEAVY = ("vramplan.dryrun", "vramplan.runtime", "vramplan.calibration", "vramplan.integrations",
         "vramplan.measurements")

#: Cycles inside the heavy layers, as sorted module tuples, with why each stays for now.
KNOWN_HEAVY_CYCLES: dict[tuple[str, ...], str] = {
}

#: Private names imported across modules in the heavy layers: (importer, module, name) -> why not fixed yet.
KNOWN_PRIVATE_IMPORTS: dict[tuple[str, str, str], str] = {
    ("vramplan.dryrun.deepspeed_engine", "vramplan.runtime.steps", "_ids"): "runtime/dryrun under rework (#11)",
    ("vramplan.dryrun.distributed", "vramplan.dryrun.tracker", "_round"): "runtime/dryrun under rework (#11)",
}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (path, is a package ``__init__``) of every module under vramplan/."""
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (p, is_pkg)
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _absolute(src: str, is_pkg: bool, node: ast.ImportFrom) -> str | None:
    if not node.level:
        return node.module
    base = src.split(".") if is_pkg else src.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class Import:
    """One import statement's target: ``src`` imports ``dst`` (lazily or not), naming ``name`` (or None)."""

    def __init__(self, src: str, dst: str, lazy: bool, name: str | None, typing_only: bool, line: int):
        self.src, self.dst, self.lazy, self.name, self.typing_only, self.line = src, dst, lazy, name, typing_only, line

    def __repr__(self) -> str:
        how = "typing-only" if self.typing_only else ("lazy" if self.lazy else "top")
        return f"{self.src}:{self.line} -> {self.dst}{'.' + self.name if self.name else ''} ({how})"


def _imports() -> list[Import]:
    out: list[Import] = []
    for mod, (path, is_pkg) in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))

        def visit(node: ast.AST, lazy: bool, typing_only: bool) -> None:
            for child in ast.iter_child_nodes(node):
                c_lazy = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.If) and _is_type_checking(child.test):
                    for b in child.body:
                        visit(ast.Module(body=[b], type_ignores=[]), c_lazy, True)
                    for b in child.orelse:
                        visit(ast.Module(body=[b], type_ignores=[]), c_lazy, typing_only)
                    continue
                if isinstance(child, ast.ImportFrom):
                    target = _absolute(mod, is_pkg, child)
                    if target and target.split(".")[0] == "vramplan":
                        for alias in child.names:
                            sub = f"{target}.{alias.name}"
                            if sub in MODULES:
                                out.append(Import(mod, sub, c_lazy, None, typing_only, child.lineno))
                            else:
                                out.append(Import(mod, target, c_lazy, alias.name, typing_only, child.lineno))
                elif isinstance(child, ast.Import):
                    for alias in child.names:
                        if alias.name.split(".")[0] == "vramplan":
                            out.append(Import(mod, alias.name, c_lazy, None, typing_only, child.lineno))
                visit(child, c_lazy, typing_only)

        visit(tree, False, False)
    return out


IMPORTS = _imports()


def _parents(dst: str, src: str) -> list[str]:
    """``dst`` and the sub-packages above it that importing it from ``src`` runs (not the root, not src's own)."""
    parts = dst.split(".")
    out = [dst]
    for k in range(2, len(parts)):
        pkg = ".".join(parts[:k])
        if pkg in MODULES and not (src == pkg or src.startswith(pkg + ".")):
            out.append(pkg)
    return out


def _graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = defaultdict(set)
    for imp in IMPORTS:
        if imp.typing_only:
            continue
        for d in _parents(imp.dst, imp.src):
            if d != imp.src and d != "vramplan" and d in MODULES:
                g[imp.src].add(d)
    return g


def _is_heavy(mod: str) -> bool:
    return any(mod == h or mod.startswith(h + ".") for h in HEAVY)


def _is_planning(mod: str) -> bool:
    return mod not in EDGE and not _is_heavy(mod)


def _cycles(nodes: set[str], g: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[tuple[str, ...]] = []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(g.get(root, set()) & nodes)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g.get(w, set()) & nodes))))
                    advanced = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(tuple(sorted(comp)))
    return out


def _explain(comp: tuple[str, ...]) -> str:
    lines = [" <-> ".join(comp)]
    lines += [f"    {imp!r}" for imp in IMPORTS if imp.src in comp and imp.dst in comp and not imp.typing_only]
    return "\n".join(lines)


def test_graph_sees_the_package():
    """The parser finds the modules and the imports it is meant to judge (a test that cannot fail is no test)."""
    assert {"vramplan.plan", "vramplan.matrix", "vramplan.planner.search", "vramplan.cli"} <= set(MODULES)
    g = _graph()
    assert "vramplan.planner.estimating" in g["vramplan.planner.fitting"]          # top-level import
    assert "vramplan.planner.search" in g["vramplan.planner.fitting"]              # lazy, inside fit()
    assert any(imp.typing_only for imp in IMPORTS if imp.src == "vramplan.results")  # TYPE_CHECKING only
    assert ("vramplan.a", "vramplan.b") in _cycles({"vramplan.a", "vramplan.b", "vramplan.c"},
                                                   {"vramplan.a": {"vramplan.b"}, "vramplan.b": {"vramplan.a", "vramplan.c"}})


def test_no_cycles_among_planning_modules():
    g = _graph()
    planning = {m for m in MODULES if _is_planning(m)}
    found = _cycles(planning, g)
    assert not found, "import cycles among the planning modules:\n" + "\n".join(_explain(c) for c in found)


#: The planner's layers, bottom first (vramplan/planner/__init__.py says what each holds).
PLANNER_LAYERS = ("checks", "estimating", "limits", "search", "techniques", "fitting")
#: The public entry points above the planner: they re-export it and nothing in the planner imports them.
ENTRY_POINTS = ("vramplan.plan", "vramplan.recommend", "vramplan.matrix")


def test_planner_layers_import_only_downward():
    """Each layer of vramplan/planner imports only layers below it; no planner layer imports an entry point."""
    g = _graph()
    assert {f"vramplan.planner.{n}" for n in PLANNER_LAYERS} == {m for m in MODULES if m.startswith("vramplan.planner.")}
    bad = []
    for i, name in enumerate(PLANNER_LAYERS):
        mod = f"vramplan.planner.{name}"
        for dst in g.get(mod, set()):
            if dst.startswith("vramplan.planner.") and PLANNER_LAYERS.index(dst.rsplit(".", 1)[1]) >= i:
                bad.append(f"{mod} -> {dst} (not below it)")
            if dst in ENTRY_POINTS:
                bad.append(f"{mod} -> {dst} (an entry point above the planner)")
    assert not bad, "\n".join(bad)
    # the planner and the modules below it never import the entry points, not even lazily
    below = [imp for imp in IMPORTS if not imp.typing_only and _is_planning(imp.src) and imp.dst in ENTRY_POINTS
             and imp.src not in ENTRY_POINTS]
    assert not below, "\n".join(map(repr, below))


def test_planning_modules_never_import_heavy_layers():
    bad = [imp for imp in IMPORTS if not imp.typing_only and _is_planning(imp.src) and _is_heavy(imp.dst)]
    assert not bad, ("a planning module imports an optional heavy layer (only the CLI/API edge and the heavy "
                     "layers may, lazily):\n" + "\n".join(map(repr, bad)))


def test_heavy_layer_cycles_are_the_known_ones():
    g = _graph()
    found = set(_cycles(set(MODULES) - EDGE, g))
    new = [c for c in found if c not in KNOWN_HEAVY_CYCLES]
    assert not new, "new import cycles:\n" + "\n".join(_explain(c) for c in new)
    gone = [c for c in KNOWN_HEAVY_CYCLES if c not in found]
    assert not gone, f"cycles no longer there, remove them from KNOWN_HEAVY_CYCLES: {gone}"


def _private_imports() -> set[tuple[str, str, str]]:
    out = set()
    for imp in IMPORTS:
        if imp.name and _is_private(imp.name) and imp.dst != imp.src:
            out.add((imp.src, imp.dst, imp.name))
    # mod._x through a module bound by an import (``from . import memory as _mem; _mem._x``)
    for mod, (path, is_pkg) in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        bound: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _absolute(mod, is_pkg, node)
                for alias in node.names:
                    if target and f"{target}.{alias.name}" in MODULES:
                        bound[alias.asname or alias.name] = f"{target}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in MODULES and alias.asname:
                        bound[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and _is_private(node.attr) and bound[node.value.id] != mod):
                out.add((mod, bound[node.value.id], node.attr))
    return out


def test_no_private_name_imported_across_modules():
    found = _private_imports()
    new = sorted(found - set(KNOWN_PRIVATE_IMPORTS))
    assert not new, ("private names imported across modules (make them public in their module, or move the "
                     "code to the layer it belongs to):\n" + "\n".join(f"    {s} imports {d}.{n}" for s, d, n in new))
    gone = sorted(set(KNOWN_PRIVATE_IMPORTS) - found)
    assert not gone, f"fixed: remove them from KNOWN_PRIVATE_IMPORTS: {gone}"


def test_known_violations_are_outside_the_planning_path():
    assert all(_is_heavy(s) for s, _d, _n in KNOWN_PRIVATE_IMPORTS)
    assert all(all(_is_heavy(m) for m in c) for c in KNOWN_HEAVY_CYCLES)


PLANNING_PATH = """
import json, sys
import vramplan
vramplan.estimate("llama-3.2-1b", "qlora", gpu="rtx4090", seq=1024)
vramplan.estimate("llama-3.2-1b", "lora", gpu="rtx4090", gpus=2, strategy="fsdp")
vramplan.fit("llama-3.2-1b", "rtx3080", methods=["lora", "dpo"])
vramplan.feasibility_matrix(models="llama-3.2-1b", methods="lora,qlora", gpus="rtx3080,rtx4090", seqs=1024)
heavy = ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
"""


def test_numpy_planning_path_imports_no_torch():
    res = subprocess.run([sys.executable, "-c", PLANNING_PATH], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    assert loaded == [], f"the planning path imported {loaded}"


@pytest.mark.parametrize("module", ["vramplan.plan", "vramplan.recommend", "vramplan.matrix"])
def test_public_entry_points_reexport_the_planner(module):
    """The historical entry points keep working: every name in their ``__all__`` resolves."""
    import importlib

    m = importlib.import_module(module)
    for name in getattr(m, "__all__", []):
        assert getattr(m, name) is not None, (module, name)
