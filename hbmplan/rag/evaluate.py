"""Evaluation of multi-turn retrieval on a ``synthetic.Benchmark``: the harness, the metrics, the
held-out protocol (lambda tuned on dev, scored once on test), a paired bootstrap, and two checks
that no gold label reaches a method.

A method sees one thing per turn: the user's words (``Turn.query``). Gold passage ids are read
only here, after the method has returned its ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from hbmplan.rag.baselines import Baseline
from hbmplan.rag.encoder import TfidfEncoder
from hbmplan.rag.matching import MatchConfig
from hbmplan.rag.pipeline import DHRAG, DHRAGConfig, TurnResult, extractive_response
from hbmplan.rag.prompt import HashTokenizer, PromptBuilder, common_prefix
from hbmplan.rag.retrieval import BM25Retriever
from hbmplan.rag.synthetic import Benchmark, Dialogue, Turn
from hbmplan.rag.tracking import TrackConfig
from hbmplan.rag.updating import UpdateConfig

__all__ = [
    "CAPPED",
    "GRID",
    "LAYOUTS",
    "METHODS",
    "SYSTEM",
    "Index",
    "Method",
    "TurnScore",
    "bootstrap_diff",
    "leak_check",
    "make_method",
    "provenance_check",
    "run",
    "summarize",
    "tune",
]

METHODS = (
    "current",
    "previous",
    "full-history",
    "dh-rag",
    "dh-rag -clustering",
    "dh-rag -hierarchical",
    "dh-rag -cot",
)
CAPPED = ("dh-rag capacity 8", "dh-rag capacity 8 evict-to 4")
"""DH-RAG with a history cap that binds in these dialogues; they reuse dh-rag's lambda."""
GRID = tuple(2.0**-k for k in range(6, -1, -1))
"""lambda values tried on dev for every method that uses history: 1/64, 1/32, ..., 1."""
LAYOUTS = ("stable", "passages-first")
SYSTEM = "You answer questions about the passages below. Answer in one sentence."
RANK_DEPTH = 10


class Method(Protocol):
    """What the harness needs: ``reset()`` between dialogues, ``turn(query) -> TurnResult``."""

    def reset(self) -> None: ...

    def turn(self, query: str) -> TurnResult: ...


@dataclass
class Index:
    """Built once per corpus and shared by the methods (read-only)."""

    retriever: BM25Retriever
    encoder: TfidfEncoder

    @classmethod
    def build(cls, corpus: Sequence[str]) -> Index:
        return cls(BM25Retriever(corpus), TfidfEncoder(corpus))


def make_method(name: str, index: Index, history_weight: float) -> Method:
    """One of ``METHODS``. The ablations switch off one DH-RAG strategy each."""
    if name in ("current", "previous", "full-history"):
        return Baseline(index.retriever, name, history_weight, ranking_depth=RANK_DEPTH)
    base = DHRAGConfig(history_weight=history_weight)
    configs = {
        "dh-rag": base,
        "dh-rag -clustering": replace(base, clustering=False),
        "dh-rag -hierarchical": replace(base, match=MatchConfig(hierarchical=False)),
        "dh-rag -cot": replace(base, track=TrackConfig(enabled=False)),
        "dh-rag capacity 8": replace(base, update=UpdateConfig(capacity=8)),
        "dh-rag capacity 8 evict-to 4": replace(base, update=UpdateConfig(capacity=8, evict_to=4)),
    }
    if name not in configs:
        raise ValueError(f"method must be one of {METHODS + CAPPED}, got {name!r}")
    return DHRAG(index.retriever, index.encoder, configs[name], ranking_depth=RANK_DEPTH)


@dataclass(frozen=True)
class TurnScore:
    dialogue: str
    turn: int
    kind: str
    rank: int | None
    """1-based rank of the gold passage in the method's top ``RANK_DEPTH``; None if absent."""
    prompt_len: tuple[int, ...]
    """Prompt tokens, one per layout in ``LAYOUTS``."""
    prefix: tuple[int, ...]
    """Tokens shared as a prefix with the previous turn's prompt (0 on the first turn)."""


def run(
    method: Method,
    dialogues: Sequence[Dialogue],
    corpus: Sequence[str],
    *,
    results: list[list[TurnResult]] | None = None,
) -> list[TurnScore]:
    """Play every dialogue through ``method`` and score each turn. The method is handed only
    ``turn.query``; ``results`` (if given) collects its raw output per dialogue."""
    tok = HashTokenizer()
    builders = [PromptBuilder(tok, SYSTEM, layout) for layout in LAYOUTS]
    out: list[TurnScore] = []
    for d in dialogues:
        method.reset()
        prev = [None] * len(builders)
        log: list[TurnResult] = []
        for t, turn in enumerate(d.turns):
            res = method.turn(turn.query)
            log.append(res)
            shown = [(i, corpus[i]) for i in res.shown]
            prompts = [b.build(res.context, shown, turn.query) for b in builders]
            prefix = tuple(
                0 if p0 is None else common_prefix(p.ids, p0.ids)
                for p, p0 in zip(prompts, prev, strict=True)
            )
            prev = prompts
            rank = res.ranking.index(turn.gold) + 1 if turn.gold in res.ranking else None
            lens = tuple(p.ids.numel() for p in prompts)
            out.append(TurnScore(d.id, t, turn.kind, rank, lens, prefix))
        if results is not None:
            results.append(log)
    return out


def summarize(scores: Sequence[TurnScore], kind: str | None = None) -> dict[str, float]:
    """recall@1, recall@5, MRR@10 (over the selected turns), and per layout the mean share of a
    turn's prompt tokens that repeat the previous turn's prompt as a prefix (turns after the
    first) and the mean prompt length."""
    sel = [s for s in scores if kind is None or s.kind == kind]
    if not sel:
        return {"turns": 0}
    ranks = [s.rank for s in sel]
    out = {
        "turns": len(sel),
        "recall@1": float(np.mean([r == 1 for r in ranks])),
        "recall@5": float(np.mean([r is not None and r <= 5 for r in ranks])),
        "mrr@10": float(np.mean([1.0 / r if r else 0.0 for r in ranks])),
    }
    later = [s for s in sel if s.turn > 0]
    for j, layout in enumerate(LAYOUTS):
        share = [s.prefix[j] / s.prompt_len[j] for s in later]
        out[f"prefix_share[{layout}]"] = float(np.mean(share)) if share else 0.0
        out[f"prompt_tokens[{layout}]"] = float(np.mean([s.prompt_len[j] for s in sel]))
    return out


def tune(
    name: str, index: Index, dev: Sequence[Dialogue], corpus: Sequence[str]
) -> tuple[float, dict[float, float]]:
    """lambda for ``name`` with the best dev MRR@10 (ties: the smaller lambda), and the dev
    MRR@10 of every lambda in ``GRID``. ``current`` ignores lambda: (0.0, {})."""
    if name == "current":
        return 0.0, {}
    mrr = {
        lam: summarize(run(make_method(name, index, lam), dev, corpus))["mrr@10"] for lam in GRID
    }
    best = max(GRID, key=lambda lam: (mrr[lam], -lam))
    return best, mrr


def bootstrap_diff(
    a: Sequence[TurnScore], b: Sequence[TurnScore], resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """MRR@10 of ``a`` minus ``b`` on the same turns, with a 95% percentile interval from a paired
    bootstrap over dialogues (turns of one dialogue are not independent)."""
    keys = [(s.dialogue, s.turn) for s in a]
    if keys != [(s.dialogue, s.turn) for s in b]:
        raise ValueError("a and b must score the same turns in the same order")
    dialogues = sorted({s.dialogue for s in a})
    pos = {d: i for i, d in enumerate(dialogues)}
    rr = lambda s: 1.0 / s.rank if s.rank else 0.0  # noqa: E731
    diff_sum = np.zeros(len(dialogues))
    count = np.zeros(len(dialogues))
    for sa, sb in zip(a, b, strict=True):
        diff_sum[pos[sa.dialogue]] += rr(sa) - rr(sb)
        count[pos[sa.dialogue]] += 1
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(dialogues), size=(resamples, len(dialogues)))
    boot = diff_sum[idx].sum(axis=1) / count[idx].sum(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(diff_sum.sum() / count.sum()), float(lo), float(hi)


def _permute_gold(bench: Benchmark, seed: int) -> Benchmark:
    """The same benchmark with every gold label replaced by another passage id."""
    rng = np.random.default_rng(seed)
    n = len(bench.corpus)

    def other(g: int) -> int:
        return int((g + rng.integers(1, n)) % n)

    splits = {
        k: tuple(
            replace(d, turns=tuple(Turn(t.query, other(t.gold), t.kind) for t in d.turns))
            for d in ds
        )
        for k, ds in bench.splits.items()
    }
    return replace(bench, splits=splits)


def leak_check(
    factory: Callable[[Benchmark], Method], bench: Benchmark, split: str, dialogues: int
) -> list[str]:
    """Run ``factory(bench)`` and ``factory(bench with every gold label changed)`` on the first
    ``dialogues`` dialogues of ``split``. A method that never reads a gold label ranks, answers
    and remembers identically in both; each difference found is returned (empty: no leak)."""
    twin = _permute_gold(bench, seed=1)
    logs = []
    for b in (bench, twin):
        log: list[list[TurnResult]] = []
        run(factory(b), b.splits[split][:dialogues], b.corpus, results=log)
        logs.append(log)
    problems = []
    for d, (la, lb) in enumerate(zip(*logs, strict=True)):
        for t, (ra, rb) in enumerate(zip(la, lb, strict=True)):
            if ra.ranking != rb.ranking or ra.response != rb.response:
                problems.append(f"dialogue {d} turn {t}: output depends on the gold label")
            if ra.context != rb.context:
                problems.append(f"dialogue {d} turn {t}: history depends on the gold label")
    return problems


def provenance_check(
    results: Sequence[Sequence[TurnResult]],
    dialogues: Sequence[Dialogue],
    corpus: Sequence[str],
) -> list[str]:
    """Every history entry a turn's prompt shows must be an earlier turn of the same dialogue,
    exactly as it happened: that turn's query, the passages it showed, its response (which the
    default responder extracts from those passages). Returns the violations (empty: none)."""
    problems = []
    for d, (log, dia) in enumerate(zip(results, dialogues, strict=True)):
        for t, res in enumerate(log):
            for e in res.context:
                if not 0 <= e.turn < t:
                    problems.append(f"dialogue {d} turn {t}: entry from turn {e.turn}")
                    continue
                past = log[e.turn]
                texts = tuple(corpus[i] for i in past.shown)
                if (
                    e.query != dia.turns[e.turn].query
                    or e.passages != past.shown
                    or e.passage_texts != texts
                    or e.response != past.response
                ):
                    problems.append(
                        f"dialogue {d} turn {t}: entry for turn {e.turn} is not what it retrieved"
                    )
            if res.response != extractive_response("", [corpus[i] for i in res.shown]):
                problems.append(f"dialogue {d} turn {t}: response not taken from its passages")
    return problems
