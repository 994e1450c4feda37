"""The package's layers, read from the source (ast): every import of the project goes down, never up or
sideways; no project import hides inside a function; the module graph has no cycle. See docs/layers.md.

    kernels  <  engine.files, engine.shapes  <  engine.models, engine.samplers  <  weights
             <  engine.edit  <  engine.runtime  <  engine.jobs  <  cli

A module may import its own layer package's modules (without a cycle) and any lower layer; two packages on
one rank (models and samplers) do not import each other. No exemptions.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = "diffedit_engine"
RANKS = {
    "kernels": 0,
    "engine.files": 1, "engine.shapes": 1,
    "engine.models": 2, "engine.samplers": 2,
    "weights": 3,
    "engine.edit": 4,
    "engine.runtime": 5,
    "engine.jobs": 6,
    "cli": 7,
}


def module_files() -> dict:
    """{dotted module name: path} for every module of the package."""
    paths = [ROOT / "cli.py", *sorted((ROOT / "engine").rglob("*.py")), *sorted((ROOT / "kernels").rglob("*.py")),
             *sorted((ROOT / "weights").rglob("*.py"))]
    out = {}
    for p in paths:
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([PKG, *parts])] = p
    return out


MODULES = module_files()


def layer(name: str) -> str | None:
    """The layer package a module belongs to (the longest RANKS key it falls under); None for the package
    roots (diffedit_engine.engine's lazy public face)."""
    rel = name[len(PKG) + 1:] if name.startswith(PKG + ".") else ""
    best = None
    for key in RANKS:
        if rel == key or rel.startswith(key + "."):
            best = key if best is None or len(key) > len(best) else best
    return best


def resolve(importer: str, is_pkg: bool, node) -> list[str]:
    """Project modules an import statement names (absolute dotted names); [] for third-party imports."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == PKG or a.name.startswith(PKG + ".")]
    if node.level:
        base = importer.split(".") if is_pkg else importer.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
        if not (mod == PKG or mod.startswith(PKG + ".")):
            return []
    names = []
    for a in node.names:
        sub = f"{mod}.{a.name}"
        names.append(sub if sub in MODULES else mod)
    return names


def imports() -> list:
    """[(importer, imported, line, module_level)] for every project import in the package."""
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_pkg = path.name == "__init__.py"
        top = set()
        for node in tree.body:  # module level, including if/try blocks at module level (not functions)
            for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                               ast.ClassDef)) else ():
                top.add(id(sub))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in resolve(name, is_pkg, node):
                    if target != name:
                        found.append((name, target, node.lineno, id(node) in top))
    return found


IMPORTS = imports()


def where(importer, line):
    return f"{MODULES[importer].relative_to(ROOT)}:{line}"


def test_every_module_has_a_layer():
    loose = [n for n in MODULES if layer(n) is None and n != f"{PKG}.engine"]
    assert not loose, f"modules outside every layer (add them to RANKS and docs/layers.md): {loose}"


def test_imports_go_down():
    bad = []
    for a, b, line, _ in IMPORTS:
        la, lb = layer(a), layer(b)
        if lb is None or la == lb:
            continue
        if la is None or RANKS[lb] >= RANKS[la]:
            bad.append(f"{where(a, line)}: {la} imports {b} ({lb}: rank {RANKS.get(lb)} >= {RANKS.get(la)})")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_project_imports_are_at_module_level():
    hidden = [f"{where(a, line)}: {b}" for a, b, line, top in IMPORTS if not top]
    assert not hidden, "project imports inside functions (the graph must read from the file tops):\n" + "\n".join(hidden)


def test_no_import_cycles():
    graph = {}
    for a, b, _, _ in IMPORTS:
        if b in MODULES and b != f"{PKG}.engine":
            graph.setdefault(a, set()).add(b)
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


@pytest.mark.parametrize("source, expect", [
    ("from ..engine.samplers import ddim", "diffedit_engine.engine.samplers.ddim"),
    ("from . import fusion", "diffedit_engine.kernels.fusion"),
    ("from .dispatch import choose", "diffedit_engine.kernels.dispatch"),
    ("import diffedit_engine.weights", "diffedit_engine.weights"),
    ("import torch", None),
])
def test_resolve_reads_relative_imports(source, expect):
    """The checker itself: relative imports resolve against the importing module (here kernels.noise_diff)."""
    node = ast.parse(source).body[0]
    got = resolve(f"{PKG}.kernels.noise_diff", False, node)
    assert got == ([expect] if expect else [])


def test_the_checker_sees_a_violation():
    """An upward import is reported (a layer test that cannot fail proves nothing)."""
    node = ast.parse("from ...cli import main").body[0]
    (target,) = resolve(f"{PKG}.engine.models.unet", False, node)
    assert layer(target) == "cli" and RANKS[layer(target)] > RANKS[layer(f"{PKG}.engine.models.unet")]
