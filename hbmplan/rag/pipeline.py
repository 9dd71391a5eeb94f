"""DH-RAG's turn loop (the paper's "History-Learning based Query Reconstruction Module" around the
database, the three strategies and the updating module): reconstruct the query from the history,
retrieve, respond, record the turn, refresh and evict.

Query reconstruction, stated once (the paper reconstructs with an LLM; these are the extractive
rules this implementation uses instead):

1. Match the query against the history (hierarchical matching over the clusters). If an entry
   matched, the chain it lies on becomes the current chain (*resume*: going back to a topic).
2. Expansion: the history adds weight ``history_weight`` (lambda) in total, split equally between
   the sources that found something: the current chain (its steps, newest weighing most) and the
   matched history (summaries and entries, each by its score); each source's items share their
   part in proportion to their weights. So lambda means the same for DH-RAG and for the
   baselines (query + lambda x previous turn, ...).
3. Given-new: the query's terms that the expansion already contains are the words by which the
   user points back ("the shipping business"); they weigh ``given_weight`` (default 0: replaced
   by what they point at), the query's other terms 1.

A turn is atomic: if a pluggable step raises, the history, the chains and the turn counter are
as they were before the call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from hbmplan.rag.clustering import cluster
from hbmplan.rag.encoder import TextEncoder
from hbmplan.rag.matching import Evidence, MatchConfig, Summarizer, keyword_summary, match
from hbmplan.rag.retrieval import BM25Retriever, WeightedQuery, tokenize
from hbmplan.rag.store import HistoryEntry, HistoryStore
from hbmplan.rag.tracking import ChainStep, ChainTracker, TrackConfig, extractive_step
from hbmplan.rag.updating import UpdateConfig, evict, refresh

__all__ = [
    "DHRAG",
    "DHRAGConfig",
    "Responder",
    "TurnResult",
    "extractive_response",
    "weighted_expansion",
]

Responder = Callable[[str, Sequence[str]], str]
"""(query, retrieved passage texts, best first) -> the response (an LLM in deployment)."""


def extractive_response(query: str, passages: Sequence[str]) -> str:
    """The default responder: the best retrieved passage, verbatim (no model)."""
    return passages[0] if passages else ""


@dataclass(frozen=True)
class DHRAGConfig:
    """DH-RAG's knobs. ``history_weight`` is the one the evaluation tunes (on dev only)."""

    history_weight: float = 0.125
    """lambda: total weight of the history's expansion relative to the query's 1 (the default
    is the value tuned on the synthetic benchmark's dev split; tune it for your data)."""
    clustering: bool = True
    """Historical query clustering; False: every entry is its own cluster (the ablation)."""
    cluster_threshold: float = 0.8
    """Cosine distance below which clusters merge (average linkage)."""
    passages_per_turn: int = 3
    """Passages shown in the prompt and stored with the turn."""
    given_weight: float = 0.0
    """Weight of the query's terms that the matched history and the chain already contain (the
    words by which the user points back); the query's other terms keep weight 1."""
    resume: bool = True
    """A query whose best matched entry lies on an earlier chain resumes that chain."""
    match: MatchConfig = field(default_factory=MatchConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)

    def __post_init__(self) -> None:
        if not (self.history_weight >= 0 and np.isfinite(self.history_weight)):
            raise ValueError(f"history_weight must be finite and >= 0, got {self.history_weight}")
        if self.passages_per_turn < 1:
            raise ValueError(f"passages_per_turn must be >= 1, got {self.passages_per_turn}")


@dataclass(frozen=True)
class TurnResult:
    """What one turn produced."""

    ranking: tuple[int, ...]
    """Passage ids, best first."""
    shown: tuple[int, ...]
    """The ones shown in the prompt and stored with the turn (a prefix of ``ranking``)."""
    response: str
    query: WeightedQuery
    """The reconstructed query sent to the retriever."""
    context: tuple[HistoryEntry, ...]
    """The history the prompt shows for this turn, oldest first (before this turn is added)."""
    evidence: tuple[Evidence, ...] = ()


def weighted_expansion(
    query: str, sources: Sequence[Sequence[tuple[str, float]]], history_weight: float
) -> WeightedQuery:
    """``[(query, 1)]`` plus each non-empty source's items sharing ``history_weight / S`` in
    proportion to their weights (``S``: sources with positive total weight)."""
    live = [[(t, float(w)) for t, w in src if w > 0 and t] for src in sources]
    live = [src for src in live if src]
    out: WeightedQuery = [(query, 1.0)]
    for src in live:
        total = sum(w for _, w in src)
        out += [(t, history_weight * w / (total * len(live))) for t, w in src]
    return out


class DHRAG:
    """One dialogue's DH-RAG state; ``reset()`` between dialogues."""

    def __init__(
        self,
        retriever: BM25Retriever,
        encoder: TextEncoder,
        config: DHRAGConfig | None = None,
        *,
        summarizer: Summarizer = keyword_summary,
        chain_step: ChainStep = extractive_step,
        responder: Responder = extractive_response,
        ranking_depth: int = 10,
    ) -> None:
        self.retriever, self.encoder = retriever, encoder
        self.config = config if config is not None else DHRAGConfig()
        self.summarizer, self.chain_step, self.responder = summarizer, chain_step, responder
        self.ranking_depth = max(ranking_depth, self.config.passages_per_turn)
        self.reset()

    def reset(self) -> None:
        self.store = HistoryStore()
        self.tracker = ChainTracker(self.encoder, self.config.track, self.chain_step)
        self._vectors: dict[int, np.ndarray] = {}
        self._turn = 0

    def reconstruct(
        self, query: str
    ) -> tuple[WeightedQuery, list[Evidence], dict[int, float], set[int]]:
        """The reconstructed query, the matched evidence, the query's similarity to each entry
        (by id) and the ids of the entries used."""
        entries = self.store.entries
        if not entries:
            return [(query, 1.0)], [], {}, set()
        cfg = self.config
        q = self.encoder.encode([query])[0]
        vecs = np.stack([self._vectors[e.id] for e in entries])
        parts = cluster(vecs, cfg.cluster_threshold, enabled=cfg.clustering)
        texts = [e.text for e in entries]
        summaries = [self.summarizer([texts[r] for r in m]) for m in parts.members]
        evidence = match(
            q,
            vecs,
            np.array([e.weight for e in entries]),
            texts,
            parts,
            summaries,
            self.encoder.encode(summaries),
            cfg.match,
        )
        entry_ev = [ev for ev in evidence if ev.level == "entry"]
        if cfg.resume and entry_ev:
            self.tracker.resume(entries[entry_ev[0].index].id)
        used = set(self.tracker.entry_ids)
        for ev in evidence:
            rows = parts.members[ev.index] if ev.level == "summary" else (ev.index,)
            used.update(entries[r].id for r in rows)
        sims = dict(zip((e.id for e in entries), (vecs @ q).tolist(), strict=True))
        matched = [(ev.text, ev.score) for ev in evidence]
        chain = self.tracker.context()
        wq = weighted_expansion(query, [chain, matched], cfg.history_weight)
        if cfg.given_weight != 1.0:
            known = {t for toks in tokenize([x for x, _ in chain + matched]) for t in toks}
            q_toks = tokenize([query])[0]
            new = " ".join(t for t in q_toks if t not in known)
            given = " ".join(t for t in q_toks if t in known)
            wq = [(new, 1.0), (given, cfg.given_weight), *wq[1:]]
        return wq, evidence, sims, used

    def turn(self, query: str) -> TurnResult:
        """Answer one user turn and record it (all or nothing)."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        saved = (self.store.copy(), [list(c) for c in self.tracker.chains], self.tracker.current,
                 dict(self._vectors), self._turn)  # fmt: skip
        try:
            return self._turn_unguarded(query)
        except BaseException:
            self.store, chains, self.tracker.current, self._vectors, self._turn = saved
            self.tracker.chains = chains
            raise

    def _turn_unguarded(self, query: str) -> TurnResult:
        cfg, t = self.config, self._turn
        wq, evidence, sims, used = self.reconstruct(query)
        ranking = self.retriever.search(wq, self.ranking_depth)
        shown = ranking[: cfg.passages_per_turn]
        texts = [self.retriever.corpus[i] for i in shown]
        response = self.responder(query, texts)
        context = tuple(self.store.entries)
        refresh(self.store, t, sims, used, cfg.update)
        entry = self.store.add(
            turn=t, query=query, passages=shown, passage_texts=texts, response=response
        )
        self._vectors[entry.id] = self.encoder.encode([entry.text])[0]
        self.tracker.observe(entry.id, query, response)
        gone = evict(self.store, cfg.update)
        for i in gone:
            del self._vectors[i]
        if gone:
            self.tracker.prune({e.id for e in self.store})
        self._turn += 1
        return TurnResult(tuple(ranking), tuple(shown), response, wq, context, tuple(evidence))
