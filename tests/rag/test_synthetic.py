"""The synthetic benchmark: deterministic, two disjoint worlds over one corpus, one gold passage
per turn, every named question answerable, every turn kind present."""

import re

import pytest

pytest.importorskip("bm25s", reason="hbmplan.rag needs the rag extra (bm25s)")
pytest.importorskip("sklearn", reason="hbmplan.rag needs the rag extra (scikit-learn)")

from hbmplan.rag.retrieval import tokenize
from hbmplan.rag.synthetic import KINDS, BenchConfig, generate
from hbmplan.rag.synthetic_schema import SCHEMA
from tests.rag.conftest import SMALL


def test_deterministic_in_config(small_bench):
    again = generate(SMALL)
    assert again.corpus == small_bench.corpus
    assert again.splits == small_bench.splits
    other = generate(BenchConfig(**{**SMALL.__dict__, "seed": SMALL.seed + 1}))
    assert other.corpus != small_bench.corpus


def test_worlds_are_disjoint_and_share_one_corpus(small_bench):
    dev, test = (set(small_bench.entities[s]) for s in ("dev", "test"))
    assert dev and test and not dev & test
    golds = {s: {t.gold for d in ds for t in d.turns} for s, ds in small_bench.splits.items()}
    assert not golds["dev"] & golds["test"]
    for split, ds in small_bench.splits.items():
        names = small_bench.entities[split]
        others = small_bench.entities["test" if split == "dev" else "dev"]
        for d in ds:
            for t in d.turns:
                passage = small_bench.corpus[t.gold]
                assert any(n in passage for n in names), passage
                assert not any(re.search(rf"\b{re.escape(n)}\b", passage) for n in others)


def test_turn_structure(small_bench):
    n = len(small_bench.corpus)
    kinds = set()
    for ds in small_bench.splits.values():
        for d in ds:
            assert SMALL.min_turns <= len(d.turns) <= SMALL.max_turns
            assert d.turns[0].kind == "opening"
            assert all(t.kind != "opening" for t in d.turns[1:])
            golds = [t.gold for t in d.turns]
            assert len(set(golds)) == len(golds), "a fact is asked at most once per dialogue"
            assert all(0 <= g < n for g in golds)
            assert d.queries == [t.query for t in d.turns]
            kinds |= {t.kind for t in d.turns}
    assert kinds == set(KINDS)


def test_named_questions_name_their_entity(small_bench):
    for split, ds in small_bench.splits.items():
        for d in ds:
            for t in d.turns:
                named = [n for n in small_bench.entities[split] if n in t.query]
                if t.kind in ("opening", "shift"):
                    assert any(n in small_bench.corpus[t.gold] for n in named), t.query
                elif t.kind in ("follow-up", "bridge"):
                    assert not named, f"{t.kind} turn names an entity: {t.query}"


@pytest.mark.parametrize("typ", sorted(SCHEMA))
def test_every_question_shares_a_key_word_with_every_passage(typ):
    """What makes a named question answerable by BM25 alone (the README's claim)."""
    slots = re.compile(r"\{\w+\}")
    for attr, spec in SCHEMA[typ].items():
        for q in spec.questions:
            qw = set(tokenize([slots.sub(" ", q)])[0])
            for p in spec.passages:
                pw = set(tokenize([slots.sub(" ", p)])[0])
                assert qw & pw, f"{typ}.{attr}: {q!r} shares no word with {p!r}"


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("entities_per_split", 10, "entities_per_split must be >= 20"),
        ("dialogues_per_split", 0, "dialogues_per_split must be >= 1"),
        ("min_turns", 1, "2 <= min_turns <= max_turns"),
        ("max_turns", 30, "max_turns must be <= entities_per_split // 2"),
        ("p_return", 0.9, "sum <= 1"),
        ("p_bridge", -0.1, ">= 0"),
    ],
)
def test_config_rejects(field, value, rule):
    with pytest.raises(ValueError, match=re.escape(rule)):
        BenchConfig(**{**SMALL.__dict__, field: value})
