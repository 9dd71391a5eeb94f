"""The evaluation end to end on a small benchmark, its metrics, and the checks that no gold label
reaches a method: they pass for every method and catch a method built to cheat."""

import json
from dataclasses import replace

import pytest

pytest.importorskip("bm25s", reason="hbmplan.rag needs the rag extra (bm25s)")
pytest.importorskip("sklearn", reason="hbmplan.rag needs the rag extra (scikit-learn)")

from hbmplan.rag.baselines import Baseline
from hbmplan.rag.evaluate import (
    CAPPED,
    GRID,
    LAYOUTS,
    METHODS,
    TurnScore,
    bootstrap_diff,
    leak_check,
    make_method,
    provenance_check,
    run,
    summarize,
    tune,
)
from hbmplan.rag.pipeline import TurnResult
from tests.rag.conftest import SMALL
from tools import rag_eval

SMALL_ARGS = ["--seed", str(SMALL.seed), "--entities", str(SMALL.entities_per_split),
              "--dialogues", "4", "--min-turns", "4", "--max-turns", "6",
              "--leak-dialogues", "2", "--no-progress"]  # fmt: skip


def test_tool_end_to_end(tmp_path, capsys):
    rc = rag_eval.main([*SMALL_ARGS, "--out", str(tmp_path), "--name", "small"])
    assert rc == 0, capsys.readouterr().out
    report = json.loads((tmp_path / "small.json").read_text())
    assert report["problems"] == []
    assert set(report["test"]) == set(METHODS + CAPPED)
    for name, s in report["test"].items():
        assert 0 <= s["recall@1"] <= s["recall@5"] <= 1 and 0 <= s["mrr@10"] <= 1
        assert report["lambda"][name] in (0.0, *GRID)
        for layout in LAYOUTS:
            assert 0 <= s[f"prefix_share[{layout}]"] <= 1
    md = (tmp_path / "small.md").read_text()
    assert "## Test split" in md and "| dh-rag |" in md and "gold-label checks" in md
    assert md in capsys.readouterr().out
    assert rag_eval.main(["--dialogues", "0", "--no-write"]) == 2


class Peeker:
    """Cheats: reads the gold label of the turn it is asked and ranks it first."""

    def __init__(self, bench, split="test"):
        self.golds = [[t.gold for t in d.turns] for d in bench.splits[split]]
        self.corpus = bench.corpus
        self.d, self.t = -1, 0

    def reset(self):
        self.d, self.t = self.d + 1, 0

    def turn(self, query):
        gold = self.golds[self.d][self.t]
        self.t += 1
        return TurnResult((gold,), (gold,), self.corpus[gold], [(query, 1.0)], ())


class Remembers(Baseline):
    """Cheats in its history: stores the gold passage as what the turn showed."""

    def __init__(self, bench, retriever):
        self.golds = [[t.gold for t in d.turns] for d in bench.splits["test"]]
        self.d = -2  # the base class resets once on construction
        super().__init__(retriever, "previous", 0.125)

    def reset(self):
        super().reset()
        self.d += 1

    def turn(self, query):
        res = super().turn(query)
        e = self.store.entries[-1]
        gold = self.golds[self.d][e.turn]
        self.store._entries[e.id] = replace(
            e, passages=(gold,), passage_texts=(self.retriever.corpus[gold],)
        )
        return res


def test_checks_pass_for_every_method(small_bench, small_index):
    for name in METHODS + CAPPED:
        assert leak_check(lambda b, n=name: make_method(n, small_index, 0.125), small_bench,
                          "test", 2) == [], name  # fmt: skip
        log = []
        run(make_method(name, small_index, 0.125), small_bench.splits["test"][:2],
            small_bench.corpus, results=log)  # fmt: skip
        assert provenance_check(log, small_bench.splits["test"][:2], small_bench.corpus) == []


def test_checks_catch_cheating_methods(small_bench, small_index):
    problems = leak_check(Peeker, small_bench, "test", 2)
    assert problems and "output depends on the gold label" in problems[0]
    problems = leak_check(lambda b: Remembers(b, small_index.retriever), small_bench, "test", 2)
    assert any("history depends on the gold label" in p for p in problems)
    log, dialogues = [], small_bench.splits["test"][:2]
    run(Remembers(small_bench, small_index.retriever), dialogues, small_bench.corpus, results=log)
    found = provenance_check(log, dialogues, small_bench.corpus)
    assert found and "is not what it retrieved" in found[0]


def _s(d, t, rank, prompt=(10, 10), prefix=(0, 0), kind="follow-up"):
    return TurnScore(d, t, kind, rank, prompt, prefix)


def test_summarize():
    scores = [_s("a", 0, 1, prefix=(0, 0), kind="opening"), _s("a", 1, 2, (20, 10), (10, 5)),
              _s("a", 2, None, (40, 10), (40, 0)), _s("b", 0, 6, kind="opening")]  # fmt: skip
    s = summarize(scores)
    assert s["turns"] == 4 and s["recall@1"] == 0.25 and s["recall@5"] == 0.5
    assert s["mrr@10"] == pytest.approx((1 + 0.5 + 0 + 1 / 6) / 4)
    assert s["prefix_share[stable]"] == pytest.approx((10 / 20 + 40 / 40) / 2)
    assert s["prefix_share[passages-first]"] == pytest.approx((5 / 10 + 0) / 2)
    assert s["prompt_tokens[stable]"] == 20
    assert summarize(scores, "opening")["mrr@10"] == pytest.approx((1 + 1 / 6) / 2)
    assert summarize(scores, "return") == {"turns": 0}


def test_bootstrap_diff():
    a = [_s(d, t, 1) for d in "abcd" for t in range(3)]
    b = [_s(d, t, 2) for d in "abcd" for t in range(3)]
    assert bootstrap_diff(a, a) == (0.0, 0.0, 0.0)
    mean, lo, hi = bootstrap_diff(a, b)
    assert mean == lo == hi == 0.5
    mixed = [_s(d, t, 1 if d in "ab" else None) for d in "abcd" for t in range(3)]
    mean, lo, hi = bootstrap_diff(mixed, b)
    assert lo < mean < hi and mean == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same turns in the same order"):
        bootstrap_diff(a, b[::-1])


def test_tune_on_dev(small_bench, small_index):
    dev = small_bench.splits["dev"][:2]
    assert tune("current", small_index, dev, small_bench.corpus) == (0.0, {})
    best, grid = tune("previous", small_index, dev, small_bench.corpus)
    assert list(grid) == list(GRID) and grid[best] == max(grid.values())
    assert best == min(lam for lam, v in grid.items() if v == grid[best]), "ties: smaller lambda"
    with pytest.raises(ValueError, match="method must be one of"):
        make_method("bm25+magic", small_index, 0.1)
