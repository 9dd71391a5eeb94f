"""DH-RAG's turn loop on a hand-made corpus: the chain resolves a pronoun, a descriptor resumes
an earlier topic, the cap holds, state resets; and the query-reconstruction rule."""

import pytest

pytest.importorskip("bm25s", reason="hbmplan.rag needs the rag extra (bm25s)")
pytest.importorskip("sklearn", reason="hbmplan.rag needs the rag extra (scikit-learn)")

from dataclasses import replace

from hbmplan.rag import DHRAG, BM25Retriever, DHRAGConfig, TfidfEncoder, TrackConfig, UpdateConfig
from hbmplan.rag.pipeline import weighted_expansion

# Distractors first: a tie would go to them (lower id), so only the history can pick the gold.
CORPUS = [
    "Orbel Works has its headquarters in Lisbet.",  # 0
    "Orbel Works is a textile business.",  # 1
    "The chief executive of Orbel Works is Maro Venn.",  # 2
    "Orbel Works was founded in 1901.",  # 3
    "Varelko Lines was founded in 1952.",  # 4
    "Varelko Lines has its headquarters in Dunmere.",  # 5
    "Varelko Lines is a shipping business.",  # 6
    "The chief executive of Varelko Lines is Tamsin Kade.",  # 7
]
DIALOGUE = [
    ("When was Varelko Lines founded?", 4),
    ("What kind of business is it?", 6),
    ("Who is the chief executive of Orbel Works?", 2),
    ("Going back to the shipping business, in which city does it have its headquarters?", 5),
]


@pytest.fixture(scope="module")
def parts():
    return BM25Retriever(CORPUS), TfidfEncoder(CORPUS)


def _play(method):
    return [method.turn(q) for q, _ in DIALOGUE]


def test_pronouns_and_a_return_resolve(parts):
    out = _play(DHRAG(*parts))
    assert [r.ranking[0] for r in out] == [g for _, g in DIALOGUE]
    last = out[-1]
    new, given = last.query[0], last.query[1]
    assert given == ("shipping business", 0.0), "the words that point back weigh nothing"
    assert set(new[0].split()) == {"going", "city", "does", "headquarters"} and new[1] == 1.0
    assert sum(w for _, w in last.query[2:]) == pytest.approx(DHRAGConfig().history_weight)


def test_a_shift_that_repeats_a_history_word_loses_it(parts):
    """The known cost of the given-new rule: 'founded' was said before, so a new company's
    founding question drops that word from its own part (the history's copy of it still
    counts, with the history's weight); given_weight=1 keeps the query whole."""
    shift = ["When was Varelko Lines founded?", "When was Orbel Works founded?"]
    m = DHRAG(*parts)
    out = [m.turn(q) for q in shift][1]
    assert out.query[:2] == [("orbel works", 1.0), ("founded", 0.0)]
    keep = DHRAG(*parts, replace(DHRAGConfig(), given_weight=1.0))
    whole = [keep.turn(q) for q in shift][1]
    assert whole.query[0] == (shift[1], 1.0) and whole.ranking[0] == 3


def test_without_the_chain_pronouns_fail(parts):
    cfg = replace(DHRAGConfig(), track=TrackConfig(enabled=False))
    out = _play(DHRAG(*parts, cfg))
    assert out[1].ranking[0] == 1, "a tie goes to the distractor"


def test_store_cap_vectors_chain_and_reset(parts):
    m = DHRAG(*parts, replace(DHRAGConfig(), update=UpdateConfig(capacity=2)))
    out = _play(m)
    assert len(m.store) == 2 and set(m._vectors) == {e.id for e in m.store}
    live = {e.id for e in m.store}
    assert all(i in live for chain in m.tracker.chains for i, _ in chain)
    assert [e.turn for e in out[-1].context] == [1, 2]
    assert all(len(r.context) <= 2 for r in out)
    m.reset()
    assert len(m.store) == 0 and m.tracker.chains == [] and m.turn(DIALOGUE[0][0]).context == ()


def test_pluggable_steps(parts):
    calls = []
    m = DHRAG(
        *parts,
        summarizer=lambda texts: calls.append(("summary", len(texts))) or "varelko",
        chain_step=lambda chain, q, r: calls.append(("step", q)) or f"step {q}",
        responder=lambda q, passages: f"answer to {q}: {passages[0]}",
    )
    out = _play(m)
    assert out[0].response == f"answer to {DIALOGUE[0][0]}: {CORPUS[4]}"
    assert m.store.entries[0].response == out[0].response
    assert ("step", DIALOGUE[0][0]) in calls and any(c[0] == "summary" for c in calls)
    assert m.tracker.chains[0][0][1] == f"step {DIALOGUE[0][0]}"


def test_a_failing_step_leaves_no_trace(parts):
    calls = {"n": 0}

    def flaky(chain, query, response):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("chain step failed")
        return response

    m, ref = DHRAG(*parts, chain_step=flaky), DHRAG(*parts)
    for q, _ in DIALOGUE[:2]:
        m.turn(q), ref.turn(q)
    before = (m.store.entries, [list(c) for c in m.tracker.chains], m.tracker.current)
    with pytest.raises(RuntimeError, match="chain step failed"):
        m.turn(DIALOGUE[2][0])
    assert (m.store.entries, m.tracker.chains, m.tracker.current) == before
    assert m.turn(DIALOGUE[2][0]).ranking == ref.turn(DIALOGUE[2][0]).ranking
    assert m.store.entries == ref.store.entries


def test_weighted_expansion():
    wq = weighted_expansion("q", [[("a", 1.0), ("b", 3.0)], [], [("c", 0.5), ("", 2.0)]], 0.5)
    assert wq == [("q", 1.0), ("a", 0.0625), ("b", 0.1875), ("c", 0.25)]
    assert weighted_expansion("q", [[], [("a", 0.0)]], 0.5) == [("q", 1.0)]


def test_rejects(parts):
    with pytest.raises(TypeError, match="query must be a str, got list"):
        DHRAG(*parts).turn(["q"])
    with pytest.raises(ValueError, match="history_weight must be finite and >= 0, got -1"):
        DHRAGConfig(history_weight=-1)
    with pytest.raises(ValueError, match="passages_per_turn must be >= 1, got 0"):
        DHRAGConfig(passages_per_turn=0)
