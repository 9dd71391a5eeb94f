"""The package layout holds: the planner is pure, the runtime alone talks to the allocator, and
no subpackages or top-level modules import each other in a cycle (read with ``ast``: every
import in a file counts, function-level and ``TYPE_CHECKING`` ones too, but PEP 562
``__getattr__`` deprecation shims)."""

from __future__ import annotations

import importlib
import textwrap
import warnings

import pytest

from tests.helpers.imports import cycles, imports, modules, package_graph

MODULES = modules()


def _leaf_private(name: str, mods) -> bool:
    """A ``_``-module that itself imports nothing from hbmplan."""
    return name.rsplit(".", 1)[-1].startswith("_") and not imports(name, mods[name])


def planner_violations(mods) -> list[str]:
    bad = []
    for name, path in mods.items():
        if name != "hbmplan.planner" and not name.startswith("hbmplan.planner."):
            continue
        for imp in imports(name, path):
            t = imp.target
            if t == "hbmplan.errors" or t.startswith(("hbmplan.planner", "hbmplan.errors.")):
                continue
            owner = max((m for m in mods if t == m or t.startswith(m + ".")), key=len, default="")
            if owner and _leaf_private(owner, mods):
                continue
            bad.append(f"{name}:{imp.line} imports {t}")
    return bad


def test_planner_imports_only_errors():
    assert planner_violations(MODULES) == []


def test_no_package_cycles():
    assert cycles(package_graph()) == []


def test_only_the_runtime_talks_to_the_allocator():
    clients = {
        name
        for name, path in MODULES.items()
        for imp in imports(name, path)
        if imp.target.startswith("hbmplan.allocator")
        and not name.startswith(("hbmplan.allocator", "hbmplan.runtime"))
    }
    assert clients == set()


def test_the_checks_see_every_kind_of_import(tmp_path):
    """A cycle through a function-level import, a TYPE_CHECKING import and a relative import
    are all found; an import inside a module-level ``__getattr__`` is not an edge."""
    pkg = tmp_path / "hbmplan"
    files = {
        "__init__.py": "",
        "errors.py": "",
        "a/__init__.py": "def f():\n    from hbmplan.b import x\n",
        "b/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..c import y\n",
        "c.py": "import hbmplan.a.deep\n",
        "a/deep.py": "",
        "planner/__init__.py": textwrap.dedent(
            """
            from hbmplan.errors import E
            def __getattr__(name):
                from hbmplan.a import moved
                return moved
            def g():
                import hbmplan.c
            """
        ),
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    graph = package_graph(tmp_path)
    assert cycles(graph) == [["a", "b", "c"]]
    assert graph["planner"] == {"errors", "c"}
    assert planner_violations(modules(tmp_path)) == ["hbmplan.planner:7 imports hbmplan.c"]


MOVED_NAMES = [
    ("hbmplan.planner", "SavedTensorCapture", "hbmplan.runtime.capture"),
    ("hbmplan.planner", "SavedStorage", "hbmplan.runtime.capture"),
    ("hbmplan.planner", "classify", "hbmplan.runtime.planning"),
]


@pytest.mark.parametrize("old, name, new", MOVED_NAMES)
def test_moved_names_still_import_with_a_warning(old, name, new):
    with pytest.warns(DeprecationWarning, match=f"{name} moved to {new}"):
        got = getattr(importlib.import_module(old), name)
    assert got is getattr(importlib.import_module(new), name)


def test_moved_modules_are_the_new_modules_with_a_warning():
    from hbmplan._moved import MOVED

    for old, new in MOVED.items():
        fresh = old not in importlib.sys.modules
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert module is importlib.import_module(new)
        assert module.__spec__.name == new
        if fresh:
            assert any(issubclass(w.category, DeprecationWarning) for w in caught), old


def test_the_package_imports_no_numpy():
    """numpy is no runtime dependency: only the optional ``hbmplan.rag`` (extra ``rag``) and the
    tests use it."""
    import ast

    users = [
        name
        for name, path in MODULES.items()
        if not name.startswith("hbmplan.rag")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(
            (a.name if isinstance(node, ast.Import) else node.module or "").split(".")[0] == "numpy"
            for a in node.names
        )
    ]
    assert users == []
