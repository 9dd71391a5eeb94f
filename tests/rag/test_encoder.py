"""TfidfEncoder computes exactly what scikit-learn's fitted TfidfVectorizer computes."""

import numpy as np
import pytest

pytest.importorskip("bm25s", reason="hbmplan.rag needs the rag extra (bm25s)")
pytest.importorskip("sklearn", reason="hbmplan.rag needs the rag extra (scikit-learn)")

from hypothesis import example, given
from hypothesis import strategies as st

from hbmplan.rag.encoder import TextEncoder, TfidfEncoder, cosine
from tests.rag.test_retrieval import CORPUS, WORDS


@pytest.fixture(scope="module")
def enc():
    return TfidfEncoder(CORPUS)


@given(st.lists(st.lists(st.sampled_from([*WORDS, "Dunmere", "1952."]), max_size=8).map(" ".join),
                min_size=1, max_size=4))  # fmt: skip
@example(["mayor mayor mayor dunmere"])
@example(["unknownword the"])
def test_same_as_tfidf_vectorizer(enc, texts):
    ref = enc.vectorizer.transform(texts).toarray()
    np.testing.assert_allclose(enc.encode(texts), ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(enc.encode(texts), ref, rtol=1e-12, atol=1e-15)  # cached


def test_rows_are_unit_or_zero(enc):
    x = enc.encode(["The mayor of Dunmere", "where the", *CORPUS])
    norms = np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(norms, [1.0, 0.0] + [1.0] * len(CORPUS))
    sims = cosine(x, x)
    assert sims.shape == (len(x), len(x))
    assert isinstance(enc, TextEncoder)


def test_rejects(enc):
    with pytest.raises(TypeError, match="list of texts"):
        enc.encode("one string")
    with pytest.raises(ValueError, match="non-empty list"):
        TfidfEncoder([])
    assert enc.encode([]).shape == (0, enc.dim)
