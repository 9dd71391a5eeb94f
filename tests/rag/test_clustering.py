"""Historical query clustering: topics with no shared word never merge, identical texts always
do, labels are canonical, the cut equals SciPy's fcluster."""

import numpy as np
import pytest

pytest.importorskip("bm25s", reason="hbmplan.rag needs the rag extra (bm25s)")
pytest.importorskip("sklearn", reason="hbmplan.rag needs the rag extra (scikit-learn)")

from hypothesis import example, given
from hypothesis import strategies as st
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from hbmplan.rag.clustering import _canonical, _cut, cluster


def _unit(x):
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


@st.composite
def topic_vectors(draw):
    """Rows drawn from topics that own disjoint coordinates (texts with no word in common)."""
    topics = draw(st.integers(1, 4))
    width = 3
    rows, owner = [], []
    for _ in range(draw(st.integers(1, 12))):
        t = draw(st.integers(0, topics - 1))
        v = np.zeros(topics * width)
        v[t * width : (t + 1) * width] = draw(
            st.lists(st.floats(0.05, 1.0), min_size=width, max_size=width)
        )
        rows.append(v)
        owner.append(t)
    return _unit(np.array(rows)), owner


@given(data=topic_vectors(), threshold=st.floats(0.05, 0.99))
@example(data=(np.eye(2), [0, 1]), threshold=0.99)
def test_topics_without_shared_words_never_merge(data, threshold):
    x, owner = data
    c = cluster(x, threshold)
    for i in range(len(owner)):
        for j in range(len(owner)):
            if owner[i] != owner[j]:
                assert c.labels[i] != c.labels[j]
    first = {}
    for lab in c.labels.tolist():
        first.setdefault(lab, len(first))
    assert list(first) == sorted(first), "labels are canonical (first appearance order)"
    assert sorted(r for m in c.members for r in m) == list(range(len(owner)))
    np.testing.assert_allclose(np.linalg.norm(c.centroids, axis=1), 1.0)


@given(data=topic_vectors())
def test_identical_rows_merge_and_threshold_two_merges_all(data):
    x, _ = data
    twice = np.concatenate([x, x])
    c = cluster(twice, 0.01)
    n = len(x)
    assert all(c.labels[i] == c.labels[i + n] for i in range(n))
    assert len(cluster(twice, 2.0)) == 1
    assert len(cluster(twice, 0.5, enabled=False)) == 2 * n


@given(
    x=st.integers(2, 14).flatmap(
        lambda n: st.lists(
            st.lists(st.floats(0, 1), min_size=4, max_size=4), min_size=n, max_size=n
        )
    ),
    t=st.floats(0.01, 1.5),
)
def test_cut_equals_scipy_fcluster(x, t):
    x = _unit(np.array(x))
    d = np.clip(1 - x @ x.T, 0, 2)
    np.fill_diagonal(d, 0)
    tree = linkage(squareform((d + d.T) / 2, checks=False), method="average")
    ref = fcluster(tree, t=t, criterion="distance")
    np.testing.assert_array_equal(_canonical(_cut(tree, len(x), t)), _canonical(ref))


def test_small_and_bad_inputs():
    assert len(cluster(np.zeros((0, 3)), 0.5)) == 0
    one = cluster(np.array([[1.0, 0.0]]), 0.5)
    assert one.labels.tolist() == [0] and one.members == ((0,),)
    with pytest.raises(ValueError, match=r"threshold must be a cosine distance in \(0, 2\], got 0"):
        cluster(np.eye(2), 0)
    with pytest.raises(ValueError, match=r"vectors must be 2-D \[n, d\], got shape \(3,\)"):
        cluster(np.ones(3), 0.5)
