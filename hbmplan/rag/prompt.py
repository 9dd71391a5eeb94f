"""The prompt builder: a turn's prompt as token ids for ``hbmplan.Group``, laid out so the part that
does not change comes first (DH-RAG's generation input: the query, passages and history).

Layout ``"stable"`` (the default)::

    system text
    for each history entry, oldest first:  its passages not shown before, "User: q", "Assistant:", " r"
    ------------------------------------------------------------------- stable_len
    this turn's passages not shown before, "User: <query>", "Assistant:"

Every piece is tokenized on its own and the ids concatenated, so a piece yields the same ids
wherever it sits (a tokenizer's merges never cross a piece boundary). Hence, while the history
only grows, turn t's whole prompt is a prefix of turn t+1's: the stored turn t adds exactly turn
t's volatile part and its response. An evicted entry changes the prompt from its position on.

Layout ``"passages-first"`` is the common RAG template (system, this turn's passages, history,
query): only the system text is stable. The evaluation reports both.

What a stable prefix buys in hbmplan today: reuse *within one group* (the G responses to one
prompt share its forward and backward) is the same for either layout. Reuse *across turns*
(turn t+1 reusing turn t's prompt K/V) needs nested prefixes, which hbmplan does not have yet;
an inference engine with prefix caching can already reuse it while sampling rollouts.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from hbmplan.rag.store import HistoryEntry

__all__ = ["BuiltPrompt", "HashTokenizer", "PromptBuilder", "Tokenizer", "common_prefix"]

Tokenizer = Callable[[str], Sequence[int]]
"""Text -> token ids (ints >= 0), e.g. ``lambda s: hf_tok.encode(s, add_special_tokens=False)``."""

Layout = Literal["stable", "passages-first"]


class HashTokenizer:
    """A model-free word tokenizer for tests and the benchmark: words and punctuation marks, each
    hashed (CRC-32) into ``[0, vocab_size)``. Deterministic across runs and machines."""

    _PIECE = re.compile(r"\w+|[^\w\s]")

    def __init__(self, vocab_size: int = 32000) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size = vocab_size

    def __call__(self, text: str) -> list[int]:
        return [zlib.crc32(p.encode()) % self.vocab_size for p in self._PIECE.findall(text)]


@dataclass(frozen=True)
class BuiltPrompt:
    """A turn's prompt."""

    ids: torch.Tensor
    """Int64 [P], P >= 2: pass as ``hbmplan.Group(prompt=ids, ...)``."""
    stable_len: int
    """Tokens before this turn's own part (system text and history)."""
    texts: tuple[str, ...]
    """The pieces, in order (their ids concatenate to ``ids``)."""


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-D id tensors."""
    n = min(a.numel(), b.numel())
    diff = torch.nonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.numel() else n


class PromptBuilder:
    """Builds prompts with one tokenizer, system text and layout.

    Args:
        tokenizer: text -> ids; called once per distinct piece (results are cached).
        system: the system text, first in every prompt.
        layout: ``"stable"`` or ``"passages-first"`` (see the module docstring).
    """

    def __init__(self, tokenizer: Tokenizer, system: str, layout: Layout = "stable") -> None:
        if not callable(tokenizer):
            raise TypeError(f"tokenizer must be callable, got {type(tokenizer).__name__}")
        if layout not in ("stable", "passages-first"):
            raise ValueError(f"layout must be 'stable' or 'passages-first', got {layout!r}")
        self.tokenizer, self.system, self.layout = tokenizer, system, layout
        self._cache: dict[str, tuple[int, ...]] = {}

    def _ids(self, text: str) -> tuple[int, ...]:
        ids = self._cache.get(text)
        if ids is None:
            out = self.tokenizer(text)
            if isinstance(out, torch.Tensor):
                out = out.tolist()
            ids = tuple(out)
            bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or i < 0]
            if bad:
                raise TypeError(
                    f"tokenizer must return ints >= 0, got {bad[:3]!r} for the text {text[:40]!r}"
                )
            if len(self._cache) < 65536:
                self._cache[text] = ids
        return ids

    def build(
        self,
        history: Sequence[HistoryEntry],
        passages: Sequence[tuple[int, str]],
        query: str,
    ) -> BuiltPrompt:
        """The prompt for ``query``, given the history to show (oldest first) and this turn's
        retrieved passages as ``(id, text)``, best first."""
        stable: list[str] = [f"{self.system}\n"]
        shown: set[int] = set()

        def new_passages(items: Sequence[tuple[int, str]]) -> list[str]:
            out = []
            for pid, text in items:
                if pid not in shown:
                    shown.add(pid)
                    out.append(f"Passage: {text}\n")
            return out

        for e in history:
            if self.layout == "stable":
                stable += new_passages(list(zip(e.passages, e.passage_texts, strict=True)))
            stable += [f"User: {e.query}\n", "Assistant:", f" {e.response}\n"]
        if self.layout == "passages-first":
            head, turns = stable[:1], stable[1:]
            stable = head
            volatile = [*new_passages(passages), *turns]
        else:
            volatile = new_passages(passages)
        volatile += [f"User: {query}\n", "Assistant:"]
        ids = [i for piece in stable for i in self._ids(piece)]
        stable_len = len(ids)
        ids += [i for piece in volatile for i in self._ids(piece)]
        if len(ids) < 2:
            raise ValueError(f"a prompt needs >= 2 tokens (a Group's P >= 2), got {len(ids)}")
        return BuiltPrompt(torch.tensor(ids, dtype=torch.int64), stable_len, (*stable, *volatile))
