"""See every tensor autograd saves during a phase, with its bytes, layer and producing op.

`SavedTensorCapture` is a ``saved_tensors_hooks`` context whose pack hook files each saved tensor
in a store it owns and hands autograd an integer ticket. Owning the store (instead of handing the
tensor back) avoids the reference cycle ``tensor -> grad_fn -> packed tensor`` that an identity
pack hook creates for saved outputs, and it is the seam the offload engine uses: a stored tensor
can be swapped for a host copy and swapped back before its unpack.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["SavedStorage", "SavedTensorCapture", "storage_key"]


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    """Identity of the memory a tensor lives in: (device, storage data pointer)."""
    return (str(t.device), t.untyped_storage().data_ptr())


@dataclass
class SavedStorage:
    """One storage kept alive by autograd; views and aliases of it count once.

    Attributes:
        key: (device, data pointer) of the storage.
        nbytes: bytes of the whole storage (what keeping it alive costs).
        dtype, shape: of the first saved tensor that referenced it.
        device: where it lives.
        layer: index of the decoder layer running when it was first saved; ``None`` outside
            the decoder layers (embedding, final norm).
        op: name of the autograd node that produced the first saved tensor (``"leaf"`` if none).
        phase: schedule phase in which it was first saved ("A", "B", ...).
        tickets: the ids autograd holds for tensors in this storage.
    """

    key: tuple[str, int]
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: torch.device
    layer: int | None
    op: str
    phase: str
    tickets: list[int] = field(default_factory=list)


class SavedTensorCapture:
    """Owns the tensors autograd saves while active; reports them by storage.

    Args:
        exclude: tensors whose storages are never recorded (the model's parameters and buffers:
            they outlive every schedule).
        layers: decoder layers; a forward pre-hook on each tells which layer is running.

    Use ``with capture.phase("A"):`` around the forward whose saved tensors to capture; the
    autograd graph built there unpacks from this store during backward. ``release()`` drops
    the store once that backward has run (or the graph is abandoned).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), layers: nn.ModuleList | None = None):
        self._exclude = {storage_key(t) for t in exclude}
        self._layers = layers
        self._store: dict[int, torch.Tensor] = {}
        self._ticket_storage: dict[int, tuple[str, int]] = {}
        self.storages: dict[tuple[str, int], SavedStorage] = {}
        self._tickets = itertools.count()
        self._phase = ""
        self._layer: int | None = None

    # -- hooks ---------------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor) -> int | torch.Tensor:
        key = storage_key(t)
        if key in self._exclude:
            return t  # parameters: autograd's own reference, no cycle (they are leaves)
        ticket = next(self._tickets)
        self._store[ticket] = t
        rec = self.storages.get(key)
        if rec is None:
            rec = SavedStorage(
                key=key,
                nbytes=t.untyped_storage().nbytes(),
                dtype=t.dtype,
                shape=tuple(t.shape),
                device=t.device,
                layer=self._layer,
                op=type(t.grad_fn).__name__ if t.grad_fn is not None else "leaf",
                phase=self._phase,
            )
            self.storages[key] = rec
        rec.tickets.append(ticket)
        self._ticket_storage[ticket] = key
        return ticket

    def _unpack(self, ticket: int | torch.Tensor) -> torch.Tensor:
        if isinstance(ticket, torch.Tensor):
            return ticket
        if ticket not in self._store:
            raise RuntimeError(
                f"saved tensor {ticket} was released before backward used it; "
                "release() must come after the backward of the captured graph"
            )
        return self._store[ticket]

    def _enter_layer(self, index: int):
        def hook(_module, _args):
            self._layer = index

        return hook

    # -- public --------------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str) -> Iterator[SavedTensorCapture]:
        """Capture the tensors saved inside the block, labelled with phase ``name``."""
        handles = []
        if self._layers is not None:
            handles = [
                layer.register_forward_pre_hook(self._enter_layer(i))
                for i, layer in enumerate(self._layers)
            ]
        self._phase, self._layer = name, None
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield self
        finally:
            for h in handles:
                h.remove()
            self._layer = None

    def stored(self, ticket: int) -> torch.Tensor:
        """The tensor held for ``ticket``."""
        return self._store[ticket]

    def replace(self, key: tuple[str, int], tensors: dict[int, torch.Tensor]) -> None:
        """Swap the stored tensors of storage ``key`` (ticket -> tensor), e.g. for a reload."""
        for ticket, t in tensors.items():
            assert self._ticket_storage[ticket] == key, "ticket belongs to another storage"
            self._store[ticket] = t

    @property
    def nbytes(self) -> int:
        """Bytes of all distinct storages recorded since the last release."""
        return sum(rec.nbytes for rec in self.storages.values())

    def release(self) -> None:
        """Drop every stored tensor and record."""
        self._store.clear()
        self._ticket_storage.clear()
        self.storages.clear()
