"""The retrieval baselines DH-RAG is compared with: the current query alone, the query plus the
previous turn, the query plus the whole history concatenated. Same retriever, same responder,
same history record as DH-RAG; only the query (and the history the prompt shows) differ.
"""

from __future__ import annotations

from typing import Literal

from hbmplan.rag.pipeline import Responder, TurnResult, extractive_response, weighted_expansion
from hbmplan.rag.retrieval import BM25Retriever
from hbmplan.rag.store import HistoryStore

__all__ = ["Baseline", "BaselineMode"]

BaselineMode = Literal["current", "previous", "full-history"]


class Baseline:
    """``current``: BM25(q). ``previous``: BM25(q) + lambda BM25(previous query + response).
    ``full-history``: BM25(q) + lambda BM25(every earlier query and response, concatenated).
    The prompt shows the same history the query used (none / the previous turn / all)."""

    def __init__(
        self,
        retriever: BM25Retriever,
        mode: BaselineMode,
        history_weight: float = 1.0,
        *,
        passages_per_turn: int = 3,
        responder: Responder = extractive_response,
        ranking_depth: int = 10,
    ) -> None:
        if mode not in ("current", "previous", "full-history"):
            raise ValueError(f"mode must be current, previous or full-history, got {mode!r}")
        if not history_weight >= 0:
            raise ValueError(f"history_weight must be >= 0, got {history_weight}")
        if passages_per_turn < 1:
            raise ValueError(f"passages_per_turn must be >= 1, got {passages_per_turn}")
        self.retriever, self.mode, self.history_weight = retriever, mode, history_weight
        self.passages_per_turn, self.responder = passages_per_turn, responder
        self.ranking_depth = max(ranking_depth, passages_per_turn)
        self.reset()

    def reset(self) -> None:
        self.store = HistoryStore()
        self._turn = 0

    def turn(self, query: str) -> TurnResult:
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        entries = self.store.entries
        context = {"current": [], "previous": entries[-1:], "full-history": entries}[self.mode]
        history = "\n".join(e.text for e in context)
        wq = weighted_expansion(query, [[(history, 1.0)]], self.history_weight)
        ranking = self.retriever.search(wq, self.ranking_depth)
        shown = ranking[: self.passages_per_turn]
        texts = [self.retriever.corpus[i] for i in shown]
        response = self.responder(query, texts)
        self.store.add(
            turn=self._turn, query=query, passages=shown, passage_texts=texts, response=response
        )
        self._turn += 1
        return TurnResult(tuple(ranking), tuple(shown), response, wq, tuple(context))
