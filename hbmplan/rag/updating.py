"""Dynamic history updating (DH-RAG, "Dynamic History Information Updating Module"): after every
turn, refresh each entry's weight from recency and relevance, insert the turn, evict under a cap.

The rule, stated once (``t`` is the current turn, ``s_i`` the similarity of the current query to
entry ``i`` clipped to [0, 1], ``m`` the momentum, ``h`` the half-life in turns):

    relevance_i <- m * relevance_i + (1 - m) * s_i
    timestamp_i <- t                          if entry i was used this turn (matched / on the chain)
    weight_i    =  relevance_i * 0.5 ** ((t - timestamp_i) / h)      (recency x relevance)

A new entry starts at relevance 1 and timestamp ``t``, so weight 1, the largest possible. When
the store holds more than ``capacity`` entries, the lowest weights go first (ties: the older
insertion) until ``evict_to`` remain. Evicting several at once (``evict_to < capacity``) moves the
prompt less often: every eviction changes the prompt from the evicted entry's position on.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from hbmplan.rag.store import HistoryStore

__all__ = ["UpdateConfig", "evict", "recency", "refresh"]


@dataclass(frozen=True)
class UpdateConfig:
    """How the history is refreshed and capped."""

    capacity: int = 16
    """Most entries kept after a turn."""
    evict_to: int | None = None
    """Entries left after an eviction (``<= capacity``); None: ``capacity`` (one at a time)."""
    half_life: float = 4.0
    """Turns after which an unused entry's recency halves."""
    momentum: float = 0.5
    """Share of the old relevance kept each turn, in [0, 1)."""

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if self.evict_to is not None and not 1 <= self.evict_to <= self.capacity:
            raise ValueError(
                f"evict_to must be in [1, capacity={self.capacity}], got {self.evict_to}"
            )
        if not self.half_life > 0:
            raise ValueError(f"half_life must be > 0 turns, got {self.half_life}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    @property
    def low_water(self) -> int:
        return self.capacity if self.evict_to is None else self.evict_to


def recency(now: int, timestamp: int, half_life: float) -> float:
    """``0.5 ** ((now - timestamp) / half_life)``: 1 when used now, halving every half-life."""
    if now < timestamp:
        raise ValueError(f"now must not precede the timestamp, got now={now} < {timestamp}")
    return 0.5 ** ((now - timestamp) / half_life)


def refresh(
    store: HistoryStore,
    now: int,
    similarity: Mapping[int, float],
    used: Collection[int],
    config: UpdateConfig,
) -> None:
    """Apply the relevance, timestamp and weight rule to every entry. ``similarity`` maps entry
    ids to the current query's similarity (missing: 0); ``used``: ids used this turn."""
    unknown = [i for i in (*similarity, *used) if i not in store]
    if unknown:
        raise KeyError(f"no history entries with ids {sorted(set(unknown))}")
    m = config.momentum
    for e in store.entries:
        s = min(max(float(similarity.get(e.id, 0.0)), 0.0), 1.0)
        rel = m * e.relevance + (1 - m) * s
        ts = now if e.id in used else e.timestamp
        store.update(
            e.id, relevance=rel, timestamp=ts, weight=rel * recency(now, ts, config.half_life)
        )


def evict(store: HistoryStore, config: UpdateConfig) -> list[int]:
    """If the store holds more than ``capacity`` entries, remove the lowest-weight ones (older
    first among equal weights) until ``evict_to`` remain. Returns the removed ids, ascending."""
    if len(store) <= config.capacity:
        return []
    order = sorted(store.entries, key=lambda e: (e.weight, e.id))
    gone = sorted(e.id for e in order[: len(store) - config.low_water])
    store.remove(gone)
    return gone
