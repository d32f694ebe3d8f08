"""The package's shape, read from its source with `ast` (nothing imported): modules import each
other without cycles, no module reaches for another's private names, and the layout is the one
docs/architecture.md draws."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moe2dense_ray"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str]]:
    """(module imported, name taken from it) for every import of the package's own modules,
    function-local imports included: a cycle through a lazy import is still a cycle."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith(PACKAGE.name):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, "") if sub in modules else (target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.startswith(PACKAGE.name)]
    return [(m, n) for m, n in found if m in modules and m != name]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycles_and_no_private_reaches():
    modules = _modules()
    edges: dict[str, set[str]] = {}
    private = []
    for name, path in modules.items():
        for target, taken in _imports(name, path, modules):
            edges.setdefault(name, set()).add(target)
            if taken.startswith("_") and not taken.startswith("__"):
                private.append(f"{name} imports {target}.{taken}")
    assert _cycles(edges) == []
    assert private == []
    # the graph is real: the stages do import the core (a test that cannot fail is a defect)
    assert "moe2dense_ray.core.source" in edges["moe2dense_ray.convert.build"]
    assert "moe2dense_ray.core.teachers" in edges["moe2dense_ray.convert.calibrate"]


def test_the_core_imports_no_stage():
    """`core` is what every stage uses, so it may not depend on any of them."""
    modules = _modules()
    stages = ("moe2dense_ray.convert", "moe2dense_ray.distill", "moe2dense_ray.eval", "moe2dense_ray.sweep",
              "moe2dense_ray.demo", "moe2dense_ray.cli")
    reaches = [f"{name} -> {target}" for name, path in modules.items() if name.startswith("moe2dense_ray.core")
               for target, _ in _imports(name, path, modules) if target.startswith(stages)]
    # (core.teachers names the pass classes it runs as strings, imported in the replica)
    assert reaches == []


def test_the_layout_is_the_pipeline():
    top = sorted(p.name for p in PACKAGE.iterdir() if not p.name.startswith(("_", ".")) and p.name != "__pycache__")
    assert top == ["assets", "cli.py", "convert", "core", "demo.py", "distill", "eval", "sweep.py"]
    for gone in ("testing.py", "corpus.py"):  # test helpers and the teacher's corpus stay out of the package
        assert not list(PACKAGE.rglob(gone))
