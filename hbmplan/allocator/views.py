"""Tensors as views of storages: what to remember of a view to rebuild it on a reloaded copy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TensorMeta", "rebuild", "storage_bytes"]


@dataclass(frozen=True)
class TensorMeta:
    """How a tensor views its storage: dtype, size, stride (elements) and storage offset
    (elements). Enough to rebuild the view on a copy of the storage."""

    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorMeta:
        return cls(t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())


def rebuild(storage: torch.UntypedStorage, meta: TensorMeta) -> torch.Tensor:
    """A tensor of ``meta``'s dtype/size/stride/offset viewing ``storage`` (no copy), on the
    storage's device. Every view of one offloaded storage is rebuilt from the one reload."""
    t = torch.empty(0, dtype=meta.dtype, device=storage.device)
    return t.set_(storage, meta.storage_offset, meta.size, meta.stride)


def storage_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """The whole storage as a ``uint8`` [nbytes] tensor (no copy)."""
    t = torch.empty(0, dtype=torch.uint8, device=storage.device)
    return t.set_(storage, 0, (storage.nbytes(),), (1,))
