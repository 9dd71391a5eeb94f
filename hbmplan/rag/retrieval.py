"""Lexical retrieval over the static knowledge base that DH-RAG's reconstructed query is sent to
("Retrieval-Augmented Generation" in the paper's method): BM25 from ``bm25s``, weighted queries.

A weighted query scores ``sum_i w_i * BM25(text_i, d)`` for every passage ``d``. With one part of
weight 1 it is plain BM25; concatenating two texts is the same as two parts of weight 1 (BM25 is
additive over query tokens), so every method in the evaluation, baseline or DH-RAG, is one
weighted query to the same index.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence

import bm25s
import numpy as np
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

__all__ = ["BM25Retriever", "WeightedQuery", "tokenize"]

WeightedQuery = list[tuple[str, float]]
"""Parts of a query, ``(text, weight)``; weights >= 0."""

_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token_pattern


@functools.lru_cache(maxsize=1 << 16)
def _tokens(text: str) -> tuple[str, ...]:
    return tuple(t for t in _TOKEN.findall(text.lower()) if t not in ENGLISH_STOP_WORDS)


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    """Lower-cased word tokens (two or more word characters) without scikit-learn's 318 English
    stop words: the analyzer of ``TfidfEncoder`` too, so every component sees the same terms
    (bm25s's own list has 33 words and keeps "where", "has", "she")."""
    if isinstance(texts, str):
        raise TypeError("tokenize takes a list of texts, got one str")
    return [list(_tokens(t)) for t in texts]


class BM25Retriever:
    """BM25 (Lucene variant, k1=1.5, b=0.75) over a fixed corpus.

    Args:
        corpus: the passages; a passage's position is its id. Indexed once (``O(tokens)``).
    """

    def __init__(self, corpus: Sequence[str]) -> None:
        if isinstance(corpus, str) or len(corpus) == 0:
            raise ValueError("corpus must be a non-empty list of passages")
        self.corpus = tuple(corpus)
        self._bm25 = bm25s.BM25()
        self._bm25.index(tokenize(self.corpus), show_progress=False)
        self._vocab = self._bm25.vocab_dict
        self._term_scores: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.corpus)

    def _term(self, tid: int) -> np.ndarray:
        scores = self._term_scores.get(tid)
        if scores is None:
            scores = self._bm25.get_scores_from_ids([tid]).astype(np.float64)
            self._term_scores[tid] = scores
        return scores

    def scores(self, query: WeightedQuery) -> np.ndarray:
        """Float64 [len(corpus)]: ``sum_i w_i * BM25(text_i, d)``; terms not in the corpus
        score 0."""
        total = np.zeros(len(self.corpus), dtype=np.float64)
        parts = [(t, float(w)) for t, w in query]
        for text, w in parts:
            if w < 0 or not np.isfinite(w):
                raise ValueError(f"query weights must be finite and >= 0, got {w} for {text!r}")
        weights: Counter[int] = Counter()
        for (_text, w), toks in zip(parts, tokenize([t for t, _ in parts]), strict=True):
            for tok in toks:
                tid = self._vocab.get(tok)
                if tid is not None and w > 0:
                    weights[tid] += w
        for tid in sorted(weights):  # a fixed order: the float sum is reproducible
            total += weights[tid] * self._term(tid)
        return total

    def search(self, query: WeightedQuery, k: int) -> list[int]:
        """The ``k`` best passage ids, best first; ties go to the lower id (deterministic)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        s = self.scores(query)
        order = np.lexsort((np.arange(len(s)), -s))
        return [int(i) for i in order[:k]]
