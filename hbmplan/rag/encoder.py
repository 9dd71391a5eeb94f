"""Text vectors for the history (clustering, matching, chain tracking; the paper embeds with a
model): a pluggable backend with a scikit-learn TF-IDF default that needs no model or download.

Any object with ``encode(texts) -> array [n, d]`` of L2-normalised rows works (a sentence
embedding model, for instance); similarities are dot products of those rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

__all__ = ["TextEncoder", "TfidfEncoder", "cosine"]


@runtime_checkable
class TextEncoder(Protocol):
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Float [len(texts), d], each row of L2 norm 1 (or 0 for a text with no known term)."""
        ...


class TfidfEncoder:
    """TF-IDF (sublinear tf, smoothed idf, English stop words removed, L2 rows) with the IDF fitted
    on the static corpus once: a rare word (a name) weighs more than a frequent one ("company").

    ``encode`` computes what the fitted ``TfidfVectorizer.transform`` computes (the tests hold it
    to that), without scikit-learn's per-call input validation, which costs milliseconds per
    call, and caches the vector of each text it has seen.

    Args:
        corpus: the knowledge-base passages the IDF is fitted on. Words not in it encode to 0.
    """

    def __init__(self, corpus: Sequence[str], cache_size: int = 65536) -> None:
        if isinstance(corpus, str) or len(corpus) == 0:
            raise ValueError("corpus must be a non-empty list of passages")
        self.vectorizer = TfidfVectorizer(sublinear_tf=True, stop_words="english", dtype=np.float64)
        self.vectorizer.fit(list(corpus))
        self._analyze = self.vectorizer.build_analyzer()
        self._vocab = self.vectorizer.vocabulary_
        self._idf = self.vectorizer.idf_
        self.dim = len(self._vocab)
        self._cache: dict[str, np.ndarray] = {}
        self._cache_size = cache_size

    def _one(self, text: str) -> np.ndarray:
        v = self._cache.get(text)
        if v is None:
            v = np.zeros(self.dim)
            counts = Counter(t for t in self._analyze(text) if t in self._vocab)
            for term, tf in counts.items():
                j = self._vocab[term]
                v[j] = (1.0 + np.log(tf)) * self._idf[j]
            norm = np.linalg.norm(v)
            if norm > 0:
                v /= norm
            v.setflags(write=False)
            if len(self._cache) < self._cache_size:
                self._cache[text] = v
        return v

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, got one str")
        if len(texts) == 0:
            return np.zeros((0, self.dim))
        return np.stack([self._one(t) for t in texts])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n, m] dot products of rows already L2-normalised (zero rows give 0)."""
    return np.asarray(a, dtype=np.float64) @ np.asarray(b, dtype=np.float64).T
