"""The README's DH-RAG example runs as written and resolves its pronoun."""

import re
from pathlib import Path

import pytest

pytest.importorskip("bm25s", reason="hbmplan.rag needs the rag extra (bm25s)")
pytest.importorskip("sklearn", reason="hbmplan.rag needs the rag extra (scikit-learn)")


def test_readme_rag_example_runs(capsys):
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Multi-turn prompts (DH-RAG)", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("Varelko Lines has its headquarters in Dunmere.")
