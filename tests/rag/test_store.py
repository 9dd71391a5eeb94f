"""The history database: insertion order, ids never reused, only updating's fields change,
every bad input rejected before any state changes."""

import pytest

pytest.importorskip("bm25s", reason="hbmplan.rag needs the rag extra (bm25s)")
pytest.importorskip("sklearn", reason="hbmplan.rag needs the rag extra (scikit-learn)")

from hbmplan.rag.store import HistoryStore


def _add(store, turn, q="q"):
    return store.add(turn=turn, query=q, passages=[turn], passage_texts=[f"p{turn}"], response="r")


def test_insertion_order_and_ids():
    s = HistoryStore()
    a, b, c = _add(s, 0), _add(s, 1), _add(s, 1)
    assert [e.id for e in s.entries] == [0, 1, 2]
    s.remove([1])
    d = _add(s, 2)
    assert [e.id for e in s] == [0, 2, 3], "ids are never reused; order is insertion order"
    assert d.id == 3 and a.timestamp == 0 and c.weight == 1.0 and c.relevance == 1.0
    assert 1 not in s and 2 in s and len(s) == 3
    assert b.text == "q\nr"


def test_update_touches_only_updating_fields():
    s = HistoryStore()
    e = _add(s, 0)
    e2 = s.update(e.id, weight=0.25, relevance=0.5, timestamp=3)
    assert (e2.weight, e2.relevance, e2.timestamp, e2.query) == (0.25, 0.5, 3, "q")
    assert s[e.id] is e2 and e.weight == 1.0, "entries are immutable values"
    with pytest.raises(ValueError, match=r"only timestamp, relevance and weight change, got \['query'\]"):  # fmt: skip
        s.update(e.id, query="x")


def test_rejects_before_changing_state():
    s = HistoryStore()
    _add(s, 3)
    with pytest.raises(ValueError, match="one text per id, got 2 ids and 1 texts"):
        s.add(turn=4, query="q", passages=[1, 2], passage_texts=["a"], response="r")
    with pytest.raises(ValueError, match="must not go back in time, got turn 2 after turn 3"):
        _add(s, 2)
    with pytest.raises(KeyError, match=r"\[7\]"):
        s.remove([0, 7])
    assert [e.id for e in s] == [0], "a rejected call changes nothing"
    assert _add(s, 4).id == 1
