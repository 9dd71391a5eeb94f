"""Hierarchical matching (DH-RAG, "Hierarchical Matching"): find the history relevant to a query top
down, cluster -> summary -> entry, instead of scanning entries flat.

1. Cluster level: each topic cluster scores ``c_k = (q.centroid_k + q.summary_k) / 2``; the
   ``top_clusters`` best with ``c_k >= min_similarity`` are kept.
2. Summary level: each kept cluster contributes its summary (the topic, in a few words) with
   score ``c_k``.
3. Entry level: inside the kept clusters, entries score ``(q.e_i) * weight_i`` (weight: recency x
   relevance from ``updating``); the ``top_entries`` best with ``q.e_i >= min_similarity``.

``hierarchical=False`` (the ablation) skips 1-2 and scores every entry flat. Summaries come from a
pluggable ``Summarizer`` (an LLM in the paper); the default, ``keyword_summary``, is extractive.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hbmplan.rag.clustering import Clusters
from hbmplan.rag.retrieval import tokenize

__all__ = ["Evidence", "MatchConfig", "Summarizer", "keyword_summary", "match"]

Summarizer = Callable[[Sequence[str]], str]
"""Texts of one cluster's entries, oldest first -> a short summary of their topic."""


def keyword_summary(texts: Sequence[str], max_terms: int = 12, min_share: float = 0.5) -> str:
    """Extractive summary: the terms found in at least ``min_share`` of the texts (all terms of a
    lone text), most texts first, ties by first occurrence; at most ``max_terms``. A term that
    every text of a topic repeats (its entity's name) is always kept."""
    if isinstance(texts, str):
        raise TypeError("keyword_summary takes a list of texts, got one str")
    if max_terms < 1 or not 0 < min_share <= 1:
        raise ValueError(
            f"need max_terms >= 1 and min_share in (0, 1], got {max_terms} and {min_share}"
        )
    if not texts:
        return ""
    docs = tokenize(list(texts))
    df: Counter[str] = Counter()
    first: dict[str, int] = {}
    for doc in docs:
        df.update(set(doc))
        for tok in doc:
            first.setdefault(tok, len(first))
    need = max(1.0, min_share * len(docs))
    kept = sorted((t for t in df if df[t] >= need), key=lambda t: (-df[t], first[t]))
    return " ".join(kept[:max_terms])


@dataclass(frozen=True)
class MatchConfig:
    """How much history a query may pull in."""

    hierarchical: bool = True
    """Cluster -> summary -> entry; False: entries scored flat (the ablation)."""
    top_clusters: int = 2
    """Clusters kept at the cluster level."""
    top_entries: int = 3
    """Entries returned."""
    min_similarity: float = 0.1
    """A cluster or entry below this cosine similarity to the query is not matched."""

    def __post_init__(self) -> None:
        if self.top_clusters < 1 or self.top_entries < 1:
            raise ValueError(
                f"top_clusters and top_entries must be >= 1, got {self.top_clusters} and "
                f"{self.top_entries}"
            )
        if not 0 <= self.min_similarity <= 1:
            raise ValueError(f"min_similarity must be in [0, 1], got {self.min_similarity}")


@dataclass(frozen=True)
class Evidence:
    """One matched piece of history: a cluster's summary or an entry's text."""

    level: str
    """``"summary"`` or ``"entry"``."""
    index: int
    """Cluster index (summary) or entry row (entry)."""
    score: float
    text: str


def _top(scores: np.ndarray, rows: Sequence[int], k: int, floor: np.ndarray) -> list[int]:
    ok = [r for r in rows if floor[r]]
    return sorted(ok, key=lambda r: (-scores[r], r))[:k]


def match(
    query: np.ndarray,
    entries: np.ndarray,
    weights: np.ndarray,
    texts: Sequence[str],
    clusters: Clusters,
    summaries: Sequence[str],
    summary_vectors: np.ndarray,
    config: MatchConfig,
) -> list[Evidence]:
    """Match ``query`` (float [d], L2 row) against the history.

    Args:
        entries: float [n, d], the entries' vectors (L2 rows), in store order.
        weights: float [n], the entries' weights in [0, 1].
        texts: the n entries' texts.
        clusters: a partition of the n rows.
        summaries / summary_vectors: one summary per cluster and its vector, float [K, d].

    Returns summaries (best cluster first) then entries (best first). Deterministic: ties go
    to the lower index.
    """
    n = entries.shape[0]
    if not (len(weights) == len(texts) == clusters.labels.shape[0] == n):
        raise ValueError(
            f"entries, weights, texts and cluster labels must agree on n, got {n}, "
            f"{len(weights)}, {len(texts)}, {clusters.labels.shape[0]}"
        )
    if len(summaries) != len(clusters) or summary_vectors.shape[0] != len(clusters):
        raise ValueError(f"need one summary per cluster ({len(clusters)}), got {len(summaries)}")
    if n == 0:
        return []
    sim = entries @ query
    entry_score = sim * np.asarray(weights, dtype=np.float64)
    entry_ok = sim >= config.min_similarity
    if not config.hierarchical:
        rows = _top(entry_score, range(n), config.top_entries, entry_ok)
        return [Evidence("entry", r, float(entry_score[r]), texts[r]) for r in rows]
    c = (clusters.centroids @ query + summary_vectors @ query) / 2
    kept = _top(c, range(len(clusters)), config.top_clusters, c >= config.min_similarity)
    out = [Evidence("summary", k, float(c[k]), summaries[k]) for k in kept]
    inside = [r for k in kept for r in clusters.members[k]]
    rows = _top(entry_score, inside, config.top_entries, entry_ok)
    out += [Evidence("entry", r, float(entry_score[r]), texts[r]) for r in rows]
    return out
