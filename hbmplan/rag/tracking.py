"""Chain-of-thought tracking (DH-RAG, "Chain of Thought Tracking"): follow the line of the
conversation across turns, so a query that only points ("who runs it?", "that founder") is read
against the steps that led to it.

The chain is a list of steps, one per turn since the current line of thought began. After each
turn a ``ChainStep`` writes the turn's step (an LLM's reasoning step in the paper; the default,
``extractive_step``, keeps the response, which names what the turn was about). The turn extends
the chain when its text is similar to the chain's recent steps (cosine >= ``continue_similarity``)
and starts a new chain otherwise (a topic shift). The next query is expanded with the last
``depth`` steps, the newest weighing 1 and each older one ``decay`` times less.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hbmplan.rag.encoder import TextEncoder

__all__ = ["ChainStep", "ChainTracker", "TrackConfig", "extractive_step"]

ChainStep = Callable[[Sequence[str], str, str], str]
"""(the chain's earlier steps, the turn's query, the turn's response) -> the turn's step text."""


def extractive_step(chain: Sequence[str], query: str, response: str) -> str:
    """The default step: the response itself (what the turn established)."""
    return response


@dataclass(frozen=True)
class TrackConfig:
    """How the chain is followed."""

    enabled: bool = True
    """False: no chain, queries get no expansion from it (the ablation)."""
    depth: int = 3
    """Steps the next query is expanded with."""
    decay: float = 0.5
    """Weight ratio of a step to the next newer one, in (0, 1]."""
    continue_similarity: float = 0.1
    """A turn at least this similar (cosine) to the chain's recent steps extends the chain."""

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if not 0 <= self.continue_similarity <= 1:
            raise ValueError(
                f"continue_similarity must be in [0, 1], got {self.continue_similarity}"
            )


class ChainTracker:
    """The conversation's chains (threads), each a list of ``(entry id, step text)``, oldest
    first; one of them is current. A query that matches history on another chain resumes it
    (``resume``): going back to an earlier topic picks up that topic's line of thought."""

    def __init__(
        self, encoder: TextEncoder, config: TrackConfig, step: ChainStep = extractive_step
    ) -> None:
        self.encoder, self.config, self.step = encoder, config, step
        self.chains: list[list[tuple[int, str]]] = []
        self.current = -1

    @property
    def steps(self) -> list[tuple[int, str]]:
        """The current chain (empty before the first turn)."""
        return self.chains[self.current] if self.chains else []

    def chain_of(self, entry_id: int) -> int | None:
        """Index of the chain holding ``entry_id``, or None."""
        for c, chain in enumerate(self.chains):
            if any(i == entry_id for i, _ in chain):
                return c
        return None

    def resume(self, entry_id: int) -> bool:
        """Make the chain holding ``entry_id`` current; False if no chain holds it."""
        c = self.chain_of(entry_id)
        if c is None or not self.config.enabled:
            return False
        self.current = c
        return True

    def context(self) -> list[tuple[str, float]]:
        """The current chain's last ``depth`` steps with their weights, newest first (empty
        when disabled)."""
        if not self.config.enabled:
            return []
        recent = self.steps[-self.config.depth :][::-1]
        return [(text, self.config.decay**i) for i, (_, text) in enumerate(recent)]

    @property
    def entry_ids(self) -> list[int]:
        """History entries on the part of the chain the next query reads."""
        if not self.config.enabled:
            return []
        return [i for i, _ in self.steps[-self.config.depth :]]

    def observe(self, entry_id: int, query: str, response: str) -> bool:
        """Add the finished turn to the current chain if it is similar enough to the chain's
        recent steps (returns True), else start a new chain with it (returns False)."""
        if not self.config.enabled:
            return False
        text = self.step([t for _, t in self.steps], query, response)
        recent = " ".join(t for _, t in self.steps[-self.config.depth :])
        extends = False
        if recent:
            a, b = self.encoder.encode([f"{query}\n{response}", recent])
            extends = float(a @ b) >= self.config.continue_similarity
        if extends:
            self.steps.append((entry_id, text))
        else:
            self.chains.append([(entry_id, text)])
            self.current = len(self.chains) - 1
        return extends

    def prune(self, live: set[int]) -> None:
        """Drop the steps of entries no longer in the store (evicted), and chains left empty;
        the current chain stays current while any of it is live, else the newest chain is."""
        cur = self.chains[self.current] if self.chains else None
        kept = []
        for chain in self.chains:
            steps = [(i, t) for i, t in chain if i in live]
            if steps:
                kept.append((chain is cur, steps))
        self.chains = [steps for _, steps in kept]
        self.current = next((k for k, (was, _) in enumerate(kept) if was), len(kept) - 1)
