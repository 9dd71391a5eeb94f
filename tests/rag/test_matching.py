"""Hierarchical matching: clusters kept by centroid+summary score, summaries first, entries only
from kept clusters, best first; flat matching scores every entry; the extractive summary."""

import numpy as np
import pytest

pytest.importorskip("bm25s", reason="hbmplan.rag needs the rag extra (bm25s)")
pytest.importorskip("sklearn", reason="hbmplan.rag needs the rag extra (scikit-learn)")

from hypothesis import example, given
from hypothesis import strategies as st

from hbmplan.rag.clustering import Clusters, cluster
from hbmplan.rag.matching import MatchConfig, keyword_summary, match

words = st.sampled_from(["varelko", "dunmere", "orbel", "mayor", "founded", "river", "tamsin"])


@given(st.lists(st.lists(words, min_size=1, max_size=5).map(" ".join), min_size=1, max_size=6),
       st.integers(1, 8), st.sampled_from([0.25, 0.5, 1.0]))  # fmt: skip
@example(["varelko founded", "varelko mayor", "varelko river"], 12, 0.5)
def test_keyword_summary(texts, max_terms, share):
    out = keyword_summary(texts, max_terms=max_terms, min_share=share).split()
    df = {w: sum(w in t.split() for t in texts) for t in texts for w in t.split()}
    need = max(1.0, share * len(texts))
    eligible = [w for w in df if df[w] >= need]
    assert set(out) <= set(eligible) and len(out) == min(max_terms, len(eligible))
    assert [df[w] for w in out] == sorted((df[w] for w in out), reverse=True)
    everywhere = [w for w in eligible if df[w] == len(texts)]
    if len(everywhere) <= max_terms:
        assert set(everywhere) <= set(out), "a term every text repeats is kept"


def _unit(x):
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


@st.composite
def histories(draw):
    n = draw(st.integers(1, 10))
    x = _unit(np.array(draw(st.lists(st.lists(st.floats(0, 1), min_size=4, max_size=4),
                                     min_size=n, max_size=n))))  # fmt: skip
    w = np.array(draw(st.lists(st.floats(0, 1), min_size=n, max_size=n)))
    q = _unit(np.array(draw(st.lists(st.floats(0, 1), min_size=4, max_size=4))))
    c = cluster(x, draw(st.floats(0.05, 1.0)))
    s = _unit(np.array(draw(st.lists(st.lists(st.floats(0, 1), min_size=4, max_size=4),
                                     min_size=len(c), max_size=len(c)))))  # fmt: skip
    cfg = MatchConfig(top_clusters=draw(st.integers(1, 3)), top_entries=draw(st.integers(1, 4)),
                      min_similarity=draw(st.sampled_from([0.0, 0.1, 0.5])))  # fmt: skip
    return x, w, q, c, s, cfg


@given(histories())
def test_hierarchical_order(h):
    x, w, q, c, s, cfg = h
    texts = [f"e{i}" for i in range(len(x))]
    out = match(q, x, w, texts, c, [f"s{k}" for k in range(len(c))], s, cfg)
    summ = [e for e in out if e.level == "summary"]
    ents = [e for e in out if e.level == "entry"]
    assert out == summ + ents, "summaries come first"
    score = (c.centroids @ q + s @ q) / 2
    ok = [k for k in range(len(c)) if score[k] >= cfg.min_similarity]
    kept = sorted(ok, key=lambda k: (-score[k], k))[: cfg.top_clusters]
    assert [e.index for e in summ] == kept
    inside = [r for k in kept for r in c.members[k] if x[r] @ q >= cfg.min_similarity]
    best = sorted(inside, key=lambda r: (-(x[r] @ q) * w[r], r))[: cfg.top_entries]
    assert [e.index for e in ents] == best
    assert all(e.text == texts[e.index] for e in ents)


@given(histories())
def test_flat_scores_every_entry(h):
    x, w, q, c, s, cfg = h
    flat = MatchConfig(hierarchical=False, top_entries=cfg.top_entries,
                       min_similarity=cfg.min_similarity)  # fmt: skip
    out = match(q, x, w, [""] * len(x), c, [""] * len(c), s, flat)
    ok = [r for r in range(len(x)) if x[r] @ q >= cfg.min_similarity]
    best = sorted(ok, key=lambda r: (-(x[r] @ q) * w[r], r))[: cfg.top_entries]
    assert [e.index for e in out] == best and all(e.level == "entry" for e in out)


def test_hierarchy_excludes_a_strong_entry_of_a_weak_topic():
    # Topic A (two entries) matches the query as a whole; B's single entry matches more by itself.
    x = _unit(np.array([[1.0, 0.0, 0.0], [1.0, 0.2, 0.0], [0.0, 0.9, 0.3]]))
    c = Clusters(np.array([0, 0, 1]), ((0, 1), (2,)),
                 _unit(np.array([[1.0, 0.1, 0.0], [0.0, 0.9, 0.3]])))  # fmt: skip
    s = _unit(np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    q = _unit(np.array([0.6, 0.8, 0.0]))
    w = np.ones(3)
    texts = ["a0", "a1", "b2"]
    hier = match(q, x, w, texts, c, ["A", "B"], s, MatchConfig(top_clusters=1, top_entries=1))
    flat = match(q, x, w, texts, c, ["A", "B"], s, MatchConfig(hierarchical=False, top_entries=1))
    assert [(e.level, e.text) for e in hier] == [("summary", "A"), ("entry", "a1")]
    assert [(e.level, e.text) for e in flat] == [("entry", "b2")]


def test_rejects():
    x = np.eye(2)
    c = cluster(x, 0.5)
    with pytest.raises(ValueError, match="must agree on n, got 2, 1, 2, 2"):
        match(x[0], x, np.ones(1), ["a", "b"], c, ["s", "t"], x, MatchConfig())
    with pytest.raises(ValueError, match=r"one summary per cluster \(2\), got 1"):
        match(x[0], x, np.ones(2), ["a", "b"], c, ["s"], x, MatchConfig())
    with pytest.raises(ValueError, match="top_clusters and top_entries must be >= 1"):
        MatchConfig(top_entries=0)
    with pytest.raises(ValueError, match=r"min_similarity must be in \[0, 1\], got 2"):
        MatchConfig(min_similarity=2)
    with pytest.raises(TypeError, match="list of texts"):
        keyword_summary("one string")
    assert keyword_summary([]) == ""
