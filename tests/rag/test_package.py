"""``import hbmplan`` needs neither the rag extra nor ``hbmplan.rag``; without the extra,
``import hbmplan.rag`` says what to install."""

import ast
import importlib
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hbmplan"
EXTRA = ("bm25s", "sklearn", "scipy", "hbmplan.rag")


def test_core_modules_never_import_the_rag_extra():
    for path in PACKAGE.rglob("*.py"):
        if "rag" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad = [n for n in names if n.split(".")[0] in EXTRA[:3] or n.startswith(EXTRA[3])]
            assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}"


def test_rag_without_the_extra_says_what_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "hbmplan.rag" or m.startswith("hbmplan.rag.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bm25s", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r"pip install 'hbmplan\[rag\]'"):
        importlib.import_module("hbmplan.rag")
