"""Dynamic updating: the recency x relevance rule, eviction of the lowest weights under the cap,
the newest entry never evicted; checked over random turn sequences."""

import math

import pytest

pytest.importorskip("bm25s", reason="hbmplan.rag needs the rag extra (bm25s)")
pytest.importorskip("sklearn", reason="hbmplan.rag needs the rag extra (scikit-learn)")

from hypothesis import example, given
from hypothesis import strategies as st

from hbmplan.rag.store import HistoryStore
from hbmplan.rag.updating import UpdateConfig, evict, recency, refresh

turn_events = st.lists(
    st.tuples(
        st.lists(st.floats(-0.5, 1.5), min_size=0, max_size=24),  # similarities, by position
        st.sets(st.integers(0, 23), max_size=4),  # positions used this turn
    ),
    min_size=1,
    max_size=30,
)
configs = st.builds(
    lambda cap, low, half, m: UpdateConfig(capacity=cap, evict_to=low and min(low, cap),
                                           half_life=half, momentum=m),
    st.integers(1, 8), st.one_of(st.none(), st.integers(1, 8)),
    st.floats(0.5, 10), st.floats(0, 0.95),
)  # fmt: skip


@given(events=turn_events, cfg=configs)
@example(events=[([], set())] * 5, cfg=UpdateConfig(capacity=2))
@example(events=[([0.3, 0.3], {0})] * 6, cfg=UpdateConfig(capacity=3, evict_to=1))
def test_refresh_and_evict(events, cfg):
    store = HistoryStore()
    for now, (sims, used_pos) in enumerate(events):
        before = {e.id: e for e in store}
        ids = [e.id for e in store.entries]
        sim = {ids[k]: s for k, s in enumerate(sims) if k < len(ids)}
        used = {ids[k] for k in used_pos if k < len(ids)}
        refresh(store, now, sim, used, cfg)
        for e in store:
            s = min(max(sim.get(e.id, 0.0), 0.0), 1.0)
            rel = cfg.momentum * before[e.id].relevance + (1 - cfg.momentum) * s
            ts = now if e.id in used else before[e.id].timestamp
            assert e.relevance == pytest.approx(rel) and 0 <= e.relevance <= 1
            assert e.timestamp == ts
            assert e.weight == pytest.approx(rel * 0.5 ** ((now - ts) / cfg.half_life))
        new = store.add(turn=now, query="q", passages=[], passage_texts=[], response="r")
        weights = {e.id: (e.weight, e.id) for e in store}
        gone = evict(store, cfg)
        assert len(store) <= cfg.capacity
        if gone:
            assert len(store) == cfg.low_water
            assert max(weights[g] for g in gone) < min(weights[e.id] for e in store)
        else:
            assert len(store) == len(weights)
        assert new.id in store, "the entry just added is never evicted"


def test_recency():
    assert recency(5, 5, 2.0) == 1.0
    assert recency(7, 5, 2.0) == 0.5
    assert math.isclose(recency(6, 5, 2.0), 2**-0.5)
    with pytest.raises(ValueError, match="now must not precede the timestamp, got now=4 < 5"):
        recency(4, 5, 2.0)


def test_refresh_rejects_unknown_ids_before_changing_state():
    store = HistoryStore()
    e = store.add(turn=0, query="q", passages=[], passage_texts=[], response="r")
    with pytest.raises(KeyError, match=r"\[9\]"):
        refresh(store, 1, {e.id: 0.0}, {9}, UpdateConfig())
    assert store[e.id].weight == 1.0


@pytest.mark.parametrize(
    ("kw", "rule"),
    [
        ({"capacity": 0}, "capacity must be >= 1, got 0"),
        ({"capacity": 4, "evict_to": 5}, r"evict_to must be in \[1, capacity=4\], got 5"),
        ({"evict_to": 0}, r"evict_to must be in \[1, capacity=16\], got 0"),
        ({"half_life": 0.0}, "half_life must be > 0 turns, got 0.0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
    ],
)
def test_config_rejects(kw, rule):
    with pytest.raises(ValueError, match=rule):
        UpdateConfig(**kw)
