"""Historical query clustering (DH-RAG, "Historical Query Clustering"): group the history's entries
into topics, so matching can first pick a topic and the prompt can name it.

Entries are clustered on their vectors (query + response, see ``HistoryEntry.text``) by
average-linkage agglomerative clustering (SciPy's ``linkage``/``fcluster``) on cosine distance
``1 - u.v``: two groups merge while their mean pairwise distance is at most ``threshold``. It is refitted on the
live entries after every update (the store is capped, so ``n`` is small), which keeps it
independent of how entries arrived and lets eviction simply drop points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

__all__ = ["Clusters", "cluster"]


@dataclass(frozen=True)
class Clusters:
    """A partition of ``n`` rows into ``K`` clusters."""

    labels: np.ndarray
    """Int64 [n]: cluster of each row; canonical (cluster k's first row precedes cluster k+1's)."""
    members: tuple[tuple[int, ...], ...]
    """Rows of each cluster, ascending."""
    centroids: np.ndarray
    """Float64 [K, d]: L2-normalised mean of each cluster's rows (0 if the mean is 0)."""

    def __len__(self) -> int:
        return len(self.members)


def _canonical(labels: np.ndarray) -> np.ndarray:
    first: dict[int, int] = {}
    for lab in labels.tolist():
        first.setdefault(lab, len(first))
    return np.array([first[lab] for lab in labels.tolist()], dtype=np.int64)


def _cut(tree: np.ndarray, n: int, threshold: float) -> np.ndarray:
    """Flat clusters from a linkage matrix: apply the merges at distance <= threshold (average
    linkage is monotone, so they come first). What ``fcluster(criterion="distance")`` does,
    without its per-call validation."""
    root = np.arange(2 * n - 1)
    for i in range(tree.shape[0]):
        if tree[i, 2] > threshold:
            break
        for child in (int(tree[i, 0]), int(tree[i, 1])):
            root[child] = n + i
    out = np.empty(n, dtype=np.int64)
    for leaf in range(n):
        node = leaf
        while root[node] != node:
            node = root[node]
        out[leaf] = node
    return out


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def cluster(vectors: np.ndarray, threshold: float, enabled: bool = True) -> Clusters:
    """Cluster the rows of ``vectors`` (float [n, d], rows L2-normalised or 0).

    ``threshold`` is a cosine distance in (0, 2]: 0.8 merges groups whose texts are on average at
    least 0.2 similar. ``enabled=False`` returns every row as its own cluster (the ablation).
    """
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"vectors must be 2-D [n, d], got shape {x.shape}")
    if not 0 < threshold <= 2:
        raise ValueError(f"threshold must be a cosine distance in (0, 2], got {threshold}")
    n = x.shape[0]
    if n <= 1 or not enabled:
        labels = np.arange(n, dtype=np.int64)
    else:
        dist = np.clip(1.0 - x @ x.T, 0.0, 2.0)
        np.fill_diagonal(dist, 0.0)
        dist = (dist + dist.T) / 2  # exact symmetry for the condensed form
        tree = linkage(squareform(dist, checks=False), method="average")
        labels = _canonical(_cut(tree, n, threshold))
    k = int(labels.max()) + 1 if n else 0
    members = tuple(tuple(np.flatnonzero(labels == c).tolist()) for c in range(k))
    centroids = (
        _normalise(np.stack([x[list(m)].mean(axis=0) for m in members]))
        if k
        else np.zeros((0, x.shape[1]))
    )
    return Clusters(labels, members, centroids)
