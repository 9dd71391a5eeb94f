"""BM25 with weighted queries, and the shared tokenizer: same scores as bm25s itself, linear in
the weights, deterministic ranking, scikit-learn's analyzer."""

import numpy as np
import pytest

pytest.importorskip("bm25s", reason="hbmplan.rag needs the rag extra (bm25s)")
pytest.importorskip("sklearn", reason="hbmplan.rag needs the rag extra (scikit-learn)")

from hypothesis import example, given
from hypothesis import strategies as st
from sklearn.feature_extraction.text import TfidfVectorizer

from hbmplan.rag.retrieval import BM25Retriever, tokenize

CORPUS = [
    "Varelko Lines was founded in 1952.",
    "Varelko Lines has its headquarters in Dunmere.",
    "The mayor of Dunmere is Tamsin Orbel.",
    "Tamsin Orbel was born in the city of Lisbet.",
    "Orbel Works is a shipping business.",
    "Dunmere lies on the banks of the Vask river.",
]
WORDS = ["varelko", "lines", "founded", "1952", "dunmere", "mayor", "orbel", "tamsin", "born",
         "shipping", "river", "unknownword", "the", "where"]  # fmt: skip
texts = st.lists(st.sampled_from(WORDS), min_size=0, max_size=6).map(" ".join)


@pytest.fixture(scope="module")
def bm25():
    return BM25Retriever(CORPUS)


def test_tokenize_is_sklearn_analyzer():
    analyzer = TfidfVectorizer(stop_words="english").build_analyzer()
    for text in [*CORPUS, "Where has she studied?", "What is Varelko's flagship product?"]:
        assert tokenize([text])[0] == analyzer(text)
    assert tokenize(["Where has she studied?"]) == [["studied"]]


def test_one_part_of_weight_one_is_bm25s(bm25):
    for q in ["mayor of Dunmere", "Where was Tamsin Orbel born?", "Varelko 1952 founded"]:
        ids = bm25._bm25.get_tokens_ids(tokenize([q])[0])
        ref = bm25._bm25.get_scores_from_ids(ids)
        np.testing.assert_allclose(bm25.scores([(q, 1.0)]), ref, rtol=1e-6)


@given(a=texts, b=texts, wa=st.floats(0, 4), wb=st.floats(0, 4))
@example(a="mayor dunmere", b="mayor dunmere", wa=1.0, wb=1.0)
def test_scores_are_linear_in_the_weights(bm25, a, b, wa, wb):
    both = bm25.scores([(a, wa), (b, wb)])
    apart = wa * bm25.scores([(a, 1.0)]) + wb * bm25.scores([(b, 1.0)])
    np.testing.assert_allclose(both, apart, rtol=1e-9, atol=1e-12)


def test_concatenation_is_two_parts_of_weight_one(bm25):
    a, b = "mayor of Dunmere", "Tamsin Orbel born"
    np.testing.assert_allclose(
        bm25.scores([(f"{a} {b}", 1.0)]), bm25.scores([(a, 1.0), (b, 1.0)]), rtol=1e-9
    )


def test_search_orders_by_score_then_id(bm25):
    assert bm25.search([("nothing matches", 1.0)], 3) == [0, 1, 2]
    top = bm25.search([("mayor Dunmere", 1.0)], 2)
    assert top[0] == 2
    s = bm25.scores([("Dunmere", 1.0)])
    ranked = bm25.search([("Dunmere", 1.0)], len(CORPUS))
    assert [s[i] for i in ranked] == sorted(s, reverse=True)


@pytest.mark.parametrize(
    ("call", "err", "rule"),
    [
        (lambda r: r.scores([("mayor", -1.0)]), ValueError, "finite and >= 0"),
        (lambda r: r.scores([("mayor", float("nan"))]), ValueError, "finite and >= 0"),
        (lambda r: r.search([("mayor", 1.0)], 0), ValueError, "k must be >= 1"),
        (lambda r: tokenize("a string"), TypeError, "list of texts"),
    ],
)
def test_rejects(bm25, call, err, rule):
    with pytest.raises(err, match=rule):
        call(bm25)
    with pytest.raises(ValueError, match="non-empty list"):
        BM25Retriever([])
