"""Chain-of-thought tracking: a turn on the same line extends the chain, a topic shift starts a
new one, a match on an earlier chain resumes it, eviction prunes it, older steps weigh less."""

import pytest

pytest.importorskip("bm25s", reason="hbmplan.rag needs the rag extra (bm25s)")
pytest.importorskip("sklearn", reason="hbmplan.rag needs the rag extra (scikit-learn)")

from hbmplan.rag.encoder import TfidfEncoder
from hbmplan.rag.tracking import ChainTracker, TrackConfig
from tests.rag.test_retrieval import CORPUS


@pytest.fixture(scope="module")
def enc():
    return TfidfEncoder(CORPUS)


def test_extends_shifts_resumes_and_prunes(enc):
    t = ChainTracker(enc, TrackConfig(depth=2, decay=0.5, continue_similarity=0.05))
    assert t.context() == [] and t.steps == []
    assert not t.observe(0, "When was Varelko Lines founded?", "Varelko Lines was founded in 1952.")
    assert t.observe(1, "Where is it based?", "Varelko Lines has its headquarters in Dunmere.")
    assert t.observe(2, "Who is that city's mayor?", "The mayor of Dunmere is Tamsin Orbel.")
    assert [i for i, _ in t.steps] == [0, 1, 2]
    assert t.context() == [
        ("The mayor of Dunmere is Tamsin Orbel.", 1.0),
        ("Varelko Lines has its headquarters in Dunmere.", 0.5),
    ]
    assert t.entry_ids == [1, 2]
    shift = "Kelso Mill was founded in 1901."
    assert not t.observe(3, "When was Kelso Mill founded?", shift), (
        "shares no word with the last two steps: a new chain"
    )
    assert [[i for i, _ in c] for c in t.chains] == [[0, 1, 2], [3]] and t.current == 1
    assert t.resume(1) and t.current == 0 and t.steps[-1][0] == 2
    assert not t.resume(99)
    t.prune({2, 3})
    assert [[i for i, _ in c] for c in t.chains] == [[2], [3]] and t.current == 0
    t.prune({3})
    assert t.chains == [[(3, shift)]] and t.current == 0


def test_custom_step_and_disabled(enc):
    seen = []

    def step(chain, query, response):
        seen.append((list(chain), query))
        return f"topic: {response}"

    t = ChainTracker(enc, TrackConfig(), step)
    t.observe(0, "q0", "Varelko Lines was founded in 1952.")
    t.observe(1, "q1", "Varelko Lines has its headquarters in Dunmere.")
    assert seen == [([], "q0"), (["topic: Varelko Lines was founded in 1952."], "q1")]
    off = ChainTracker(enc, TrackConfig(enabled=False))
    assert off.observe(0, "q", "r") is False and off.context() == [] and off.entry_ids == []
    assert not off.resume(0)


@pytest.mark.parametrize(
    ("kw", "rule"),
    [
        ({"depth": 0}, "depth must be >= 1, got 0"),
        ({"decay": 0.0}, r"decay must be in \(0, 1\], got 0.0"),
        ({"continue_similarity": 1.5}, r"continue_similarity must be in \[0, 1\], got 1.5"),
    ],
)
def test_config_rejects(kw, rule):
    with pytest.raises(ValueError, match=rule):
        TrackConfig(**kw)
