"""Shared fixtures for the DH-RAG tests: one small synthetic benchmark and its index."""

import pytest

pytest.importorskip("bm25s", reason="hbmplan.rag needs the rag extra (bm25s)")
pytest.importorskip("sklearn", reason="hbmplan.rag needs the rag extra (scikit-learn)")

from hbmplan.rag.evaluate import Index
from hbmplan.rag.synthetic import BenchConfig, generate

SMALL = BenchConfig(seed=3, entities_per_split=40, dialogues_per_split=6, min_turns=4, max_turns=8)


@pytest.fixture(scope="session")
def small_bench():
    return generate(SMALL)


@pytest.fixture(scope="session")
def small_index(small_bench):
    return Index.build(small_bench.corpus)
