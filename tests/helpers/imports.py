"""hbmplan's import graph, read with ``ast`` (nothing is imported): every import statement in a
file, module-level, in functions and under ``TYPE_CHECKING`` alike, except those inside a
module-level ``__getattr__`` (PEP 562 deprecation shims). ``python -m tests.helpers.imports``
prints the package-level graph."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Import", "cycles", "imports", "modules", "package_graph", "unit"]

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Import:
    """One imported hbmplan module (or a name of one: ``from m import x`` yields ``m.x``)."""

    source: str
    """The importing module, dotted."""
    target: str
    """The imported dotted name."""
    line: int


def modules(root: Path = ROOT, package: str = "hbmplan") -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``package`` under ``root``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _statements(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import in the file but those inside a module-level ``__getattr__``."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            continue
        for sub in ast.walk(node):
            if isinstance(sub, (ast.Import, ast.ImportFrom)):
                yield sub


def imports(name: str, path: Path, package: str = "hbmplan") -> list[Import]:
    """The hbmplan imports of module ``name`` (whose file is ``path``)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out = []
    for node in _statements(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                up = here[: len(here) - (node.level - 1)]
                base = ".".join([*up, *([node.module] if node.module else [])])
            targets = [f"{base}.{a.name}" for a in node.names]
            if base != package:  # ``from hbmplan import x`` is about x alone
                targets.append(base)
        out += [
            Import(name, t, node.lineno)
            for t in targets
            if t == package or t.startswith(package + ".")
        ]
    return out


def unit(dotted: str, package: str = "hbmplan") -> str:
    """The package-level node of a dotted name: the subpackage or top-level module it is in
    (``hbmplan.runtime.capture`` -> ``runtime``, ``hbmplan.memory`` -> ``memory``); the root
    package itself is ``hbmplan``."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else package


def package_graph(root: Path = ROOT, package: str = "hbmplan") -> dict[str, set[str]]:
    """Package-level edges: node -> the nodes it imports (self-edges left out)."""
    mods = modules(root, package)
    graph: dict[str, set[str]] = {unit(m, package): set() for m in mods}
    for name, path in mods.items():
        src = unit(name, package)
        for imp in imports(name, path, package):
            dst = unit(imp.target, package)
            if dst not in graph:  # a name the root package exports (``from hbmplan import Group``)
                dst = package
            if dst != src:
                graph[src].add(dst)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (each holds a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    g = package_graph(root)
    for node in sorted(g):
        print(f"{node:<12} -> {', '.join(sorted(g[node])) or '-'}")
    print("cycles:", cycles(g) or "none")
