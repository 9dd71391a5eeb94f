"""The gradient cache: prompt K/V leaves for phase B and the gK/gV they accumulate.

Every response microbatch reads the prompt's K/V through `GradientCache.views()` (padded rows)
or `GradientCache.packed()` (packed rows, through the prefix-attention kernel). Their backward
adds the microbatch's dK/dV straight into one preallocated buffer per layer (fp32 for 16-bit
models), so no leaf ``.grad`` in the model's precision is ever rounded between microbatches. Phase
C hands the totals to the prompt's autograd graph in one backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hbmplan.kernels.accumulate import accumulate_into, accumulation_dtype
from hbmplan.models.packed import KV, KernelImpl, PackedPrefix, as_rows

__all__ = ["GradientCache"]


def _leaf(x: torch.Tensor) -> torch.Tensor:
    """Phase B's alias of ``x``: a leaf that requires grad when ``x`` is in a graph."""
    return x.detach().requires_grad_(x.requires_grad)


def _buffer(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor | None:
    """The zeroed gradient buffer of ``x``; ``None`` when ``x`` needs no gradient."""
    if not x.requires_grad:
        return None
    return torch.zeros_like(x, dtype=dtype or accumulation_dtype(x.dtype))


def _rows(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else as_rows(x)


class GradientCache:
    """Detached prompt K/V and their accumulated gradients.

    Args:
        prompt_kv: per layer (k, v), each [1, Hkv, P-1, D], still attached to the prompt graph.
        dtype: accumulation dtype; default :func:`accumulation_dtype` of the K/V dtype.

    A K or V without a graph (``requires_grad`` False: it comes only from frozen weights, as
    layer 0's K under LoRA on q/v, or phase A ran without a graph) needs no gradient: its leaf
    does not require grad and it has no buffer (``None`` in :attr:`grads`).

    Memory: the leaves alias the prompt K/V (no copy); the buffers cost
    ``Hkv * (P-1) * D * itemsize(dtype)`` bytes per K or V that requires grad (at most
    ``2 * L`` of them).
    """

    def __init__(self, prompt_kv: list[KV], dtype: torch.dtype | None = None) -> None:
        self.prompt_kv = prompt_kv
        self.leaves: list[KV] = [(_leaf(k), _leaf(v)) for k, v in prompt_kv]
        self.grads: list[tuple[torch.Tensor | None, torch.Tensor | None]] = [
            (_buffer(k, dtype), _buffer(v, dtype)) for k, v in prompt_kv
        ]

    def views(self) -> list[KV]:
        """Per layer (k, v) for one microbatch; their gradients accumulate into the cache (a K
        or V without a buffer is its leaf, which needs no gradient)."""
        return [
            tuple(x if g is None else accumulate_into(x, g) for x, g in zip(kv, gs, strict=True))
            for kv, gs in zip(self.leaves, self.grads, strict=True)
        ]

    def packed(
        self,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        impl: KernelImpl,
        deterministic: bool = False,
    ) -> PackedPrefix:
        """The prompt K/V for one packed microbatch (rows bounded by ``cu_seqlens``): the leaves
        as [P-1, Hkv, D] views, and the buffers as the kernel's ``grad_cache``, so its backward
        adds dK/dV in place (``None`` where a K or V needs no gradient: the kernel skips it). No
        copy of either."""
        return PackedPrefix(
            kv=[(as_rows(k), as_rows(v)) for k, v in self.leaves],
            grad_cache=[(_rows(gk), _rows(gv)) for gk, gv in self.grads],
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            impl=impl,
            deterministic=deterministic,
        )

    @property
    def kv_bytes(self) -> int:
        """Bytes of the prompt K/V (all layers)."""
        return sum(k.nbytes + v.nbytes for k, v in self.prompt_kv)

    @property
    def nbytes(self) -> int:
        """Bytes of the gradient buffers (all layers; a K or V without a graph has none)."""
        return sum(g.nbytes for gs in self.grads for g in gs if g is not None)

    def backward(self, extra: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> None:
        """Phase C: one backward through the prompt graph from the accumulated gK/gV, together
        with ``extra`` (tensor, gradient) pairs of the same graph (a MoE prompt's routing sums).
        Only tensors with a buffer take part; with none (every parameter the prompt forward
        reaches is frozen) there is nothing to do."""
        tensors, grads = [t for t, _ in extra], [g for _, g in extra]
        for kv, gs in zip(self.prompt_kv, self.grads, strict=True):
            for x, g in zip(kv, gs, strict=True):
                if g is not None:
                    tensors.append(x)
                    grads.append(g.to(x.dtype))
        self.grads = []  # the cast copies are all that phase C needs
        if tensors:
            torch.autograd.backward(tensors, grads)
        self.release()

    def release(self) -> None:
        """Drop every reference to the prompt graph, the leaves and the buffers."""
        self.prompt_kv, self.leaves, self.grads = [], [], []
