"""The dynamic historical information database (DH-RAG, "Dynamic Historical Information Database"):
one entry per finished turn, holding only what that turn really had.

An entry is the user's query, the passages retrieval returned for it, the response the system
produced, a timestamp and the relevance/weight the updating module maintains. Entries keep their
insertion order (``id`` grows by one per insert); that order is what the prompt builder lays out,
so an entry's place in the prompt never moves while it is stored.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

__all__ = ["HistoryEntry", "HistoryStore"]


@dataclass(frozen=True)
class HistoryEntry:
    """One finished turn."""

    id: int
    """Insertion number: 0, 1, 2, ... in the order entries were added (never reused)."""
    turn: int
    """The dialogue turn it records (0-based)."""
    query: str
    """The user's words, as typed."""
    passages: tuple[int, ...]
    """Ids of the passages retrieval returned for the turn, best first (what the prompt showed)."""
    passage_texts: tuple[str, ...]
    """Their texts, same order."""
    response: str
    """What the system answered (generated or extracted), never a reference answer."""
    timestamp: int
    """Logical time of the last use: the turn it was inserted or last matched by a query."""
    relevance: float = 1.0
    """In [0, 1]: how relevant the entry has been to recent queries (see ``updating``)."""
    weight: float = 1.0
    """In [0, 1]: recency x relevance, the eviction order (lowest goes first)."""

    @property
    def text(self) -> str:
        """What the history's vectors are computed from: query and response. A follow-up query
        alone ("who runs it?") names no topic; its response does."""
        return f"{self.query}\n{self.response}"


class HistoryStore:
    """Entries in insertion order, addressable by id."""

    def __init__(self) -> None:
        self._entries: dict[int, HistoryEntry] = {}
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[HistoryEntry]:
        return iter(self._entries.values())

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._entries

    def __getitem__(self, entry_id: int) -> HistoryEntry:
        return self._entries[entry_id]

    @property
    def entries(self) -> list[HistoryEntry]:
        """All entries, oldest insertion first."""
        return list(self._entries.values())

    def add(
        self,
        *,
        turn: int,
        query: str,
        passages: Sequence[int],
        passage_texts: Sequence[str],
        response: str,
    ) -> HistoryEntry:
        """Append the record of a finished turn (relevance and weight 1, timestamp ``turn``)."""
        if len(passages) != len(passage_texts):
            raise ValueError(
                f"passages and passage_texts must have one text per id, got {len(passages)} ids "
                f"and {len(passage_texts)} texts"
            )
        if self._entries and turn < max(e.turn for e in self._entries.values()):
            raise ValueError(
                f"turns must not go back in time, got turn {turn} after turn "
                f"{max(e.turn for e in self._entries.values())}"
            )
        entry = HistoryEntry(
            id=self._next_id,
            turn=int(turn),
            query=str(query),
            passages=tuple(int(p) for p in passages),
            passage_texts=tuple(passage_texts),
            response=str(response),
            timestamp=int(turn),
        )
        self._entries[entry.id] = entry
        self._next_id += 1
        return entry

    def copy(self) -> HistoryStore:
        """An independent store with the same entries and the same next id."""
        other = HistoryStore()
        other._entries = dict(self._entries)
        other._next_id = self._next_id
        return other

    def update(self, entry_id: int, **changes: float | int) -> HistoryEntry:
        """Replace an entry's ``timestamp``/``relevance``/``weight`` (the fields updating owns)."""
        bad = set(changes) - {"timestamp", "relevance", "weight"}
        if bad:
            raise ValueError(f"only timestamp, relevance and weight change, got {sorted(bad)}")
        entry = replace(self._entries[entry_id], **changes)
        self._entries[entry_id] = entry
        return entry

    def remove(self, entry_ids: Sequence[int]) -> None:
        """Drop entries; the others keep their ids and order."""
        missing = [i for i in entry_ids if i not in self._entries]
        if missing:
            raise KeyError(f"no history entries with ids {missing}")
        for i in entry_ids:
            del self._entries[i]
