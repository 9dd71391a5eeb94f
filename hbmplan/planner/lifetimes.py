"""Lifetimes of the prompt's saved tensors, classified hot or dormant from the schedule's phases.

Every storage autograd saves in phase A is used again in phase C (the prompt backward). It is
*hot* when phase B also reads it (the prompt K/V, which every response microbatch attends to);
otherwise it is *dormant* through phase B and may be offloaded or recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Lifetime", "rescale"]


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


def rescale(
    lifetimes: Sequence[Lifetime],
    tensors: dict[int, tuple[tuple[int, ...], int]],
    tokens: int,
    new_tokens: int,
) -> list[Lifetime]:
    """The lifetimes of the same forward over ``new_tokens`` prompt tokens instead of ``tokens``.

    ``tensors[id]`` is the (shape, bytes) of the first saved tensor of storage ``id``. Its bytes
    scale by ``(new_tokens / tokens) ** k``, ``k`` the dims of its shape equal to ``tokens``: exact
    for tensors linear in the sequence ([.., P, ..]) or quadratic ([P, P] masks); the rest of the
    storage (a view's base beyond the view, e.g. the prompt ids of which phase A reads all but
    the last) stays. A dim that equals ``tokens`` by chance (a head dim, say) scales wrongly, so a
    prediction must be checked against the real capture.
    """
    if tokens < 1 or new_tokens < 1:
        raise ValueError(f"token counts must be >= 1, got {tokens} and {new_tokens}")
    out = []
    for lt in lifetimes:
        shape, tensor_bytes = tensors[lt.id]
        k = sum(1 for d in shape if d == tokens)
        nbytes = lt.nbytes - tensor_bytes + tensor_bytes * new_tokens**k // tokens**k
        out.append(Lifetime(lt.id, nbytes, lt.layer, lt.op, lt.dtype, lt.born, lt.used))
    return out
