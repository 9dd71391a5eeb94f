"""Lifetimes of the prompt's saved tensors, classified hot or dormant from the schedule's phases.

Every storage autograd saves in phase A is used again in phase C (the prompt backward). It is
*hot* when phase B also reads it (the prompt K/V, which every response microbatch attends to);
otherwise it is *dormant* through phase B and may be offloaded or recomputed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from hbmplan.planner.capture import SavedStorage, storage_key

__all__ = ["Lifetime", "classify"]


@dataclass(frozen=True)
class Lifetime:
    """One saved storage of the prompt graph.

    Attributes:
        id: the storage's capture-order id (stable for a given model and shape).
        nbytes: bytes of the storage.
        layer: the last decoder layer that saved it (``None``: only outside the layers). Its
            forward is the last to reference it; phase C's backward first needs it there.
        op: autograd node that produced it.
        dtype: its dtype, as a string (``"torch.bfloat16"``).
        born: phase that created it ("A").
        used: phases that read it, in order: ``("B", "C")`` hot, ``("C",)`` dormant.
    """

    id: int
    nbytes: int
    layer: int | None
    op: str
    dtype: str
    born: str
    used: tuple[str, ...]

    @property
    def hot(self) -> bool:
        """Read during phase B: must stay on the device."""
        return "B" in self.used


def classify(storages: Iterable[SavedStorage], read_in_b: Sequence[torch.Tensor]) -> list[Lifetime]:
    """Lifetimes of phase-A storages; ``read_in_b`` are the tensors phase B reads (K/V leaves)."""
    hot = {storage_key(t) for t in read_in_b}
    return [
        Lifetime(
            id=rec.id,
            nbytes=rec.nbytes,
            layer=rec.last_layer,
            op=rec.op,
            dtype=str(rec.dtype),
            born=rec.phase,
            used=("B", "C") if rec.key in hot else ("C",),
        )
        for rec in storages
    ]
