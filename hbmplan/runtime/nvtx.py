"""NVTX ranges for Nsight Systems: ``hbmplan.reuse.A``/``B``/``C`` around the reuse step's phases
(a participant) and :func:`nvtx_range` for any other block. No-ops without CUDA."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from hbmplan.runtime.participant import GroupContext, Participant

__all__ = ["NvtxRanges", "nvtx_range"]


@contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range on CUDA (visible in Nsight Systems); a no-op elsewhere."""
    if torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


class NvtxRanges(Participant):
    """Ranges ``{prefix}.A`` (``before_a`` to ``after_a``), ``.B`` (to ``before_c``) and ``.C``
    (to ``after_c``) of every group; an aborted step closes the ones it left open."""

    def __init__(self, prefix: str = "hbmplan.reuse") -> None:
        self.prefix = prefix
        self._open = 0
        self._on = torch.cuda.is_available()

    def _push(self, phase: str) -> None:
        if self._on:
            torch.cuda.nvtx.range_push(f"{self.prefix}.{phase}")
            self._open += 1

    def _pop(self) -> None:
        if self._open:
            torch.cuda.nvtx.range_pop()
            self._open -= 1

    def before_a(self, ctx: GroupContext) -> None:
        self._push("A")

    def after_a(self, ctx: GroupContext) -> None:
        self._pop()
        self._push("B")

    def before_c(self, ctx: GroupContext) -> None:
        self._pop()
        self._push("C")

    def after_c(self, ctx: GroupContext) -> None:
        self._pop()

    def abort(self, exc: BaseException) -> None:
        while self._open:
            self._pop()
