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


class GradientCache:
    """Detached prompt K/V and their accumulated gradients.

    Args:
        prompt_kv: per layer (k, v), each [1, Hkv, P-1, D], still attached to the prompt graph.
        dtype: accumulation dtype; default :func:`accumulation_dtype` of the K/V dtype.

    Memory: the leaves alias the prompt K/V (no copy); the buffers cost
    ``2 * L * Hkv * (P-1) * D * itemsize(dtype)`` bytes.
    """

    def __init__(self, prompt_kv: list[KV], dtype: torch.dtype | None = None) -> None:
        self.prompt_kv = prompt_kv
        self.leaves: list[KV] = [
            (k.detach().requires_grad_(), v.detach().requires_grad_()) for k, v in prompt_kv
        ]
        self.grads: list[KV] = [
            (
                torch.zeros_like(k, dtype=dtype or accumulation_dtype(k.dtype)),
                torch.zeros_like(v, dtype=dtype or accumulation_dtype(v.dtype)),
            )
            for k, v in prompt_kv
        ]

    def views(self) -> list[KV]:
        """Per layer (k, v) for one microbatch; their gradients accumulate into the cache."""
        return [
            (accumulate_into(k, gk), accumulate_into(v, gv))
            for (k, v), (gk, gv) in zip(self.leaves, self.grads, strict=True)
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
        adds dK/dV in place. No copy of either."""
        return PackedPrefix(
            kv=[(as_rows(k), as_rows(v)) for k, v in self.leaves],
            grad_cache=[(as_rows(gk), as_rows(gv)) for gk, gv in self.grads],
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
        """Bytes of the gradient buffers (all layers)."""
        return sum(gk.nbytes + gv.nbytes for gk, gv in self.grads)

    def backward(self, extra: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> None:
        """Phase C: one backward through the prompt graph from the accumulated gK/gV, together
        with ``extra`` (tensor, gradient) pairs of the same graph (a MoE prompt's routing sums)."""
        tensors, grads = [t for t, _ in extra], [g for _, g in extra]
        for (k, v), (gk, gv) in zip(self.prompt_kv, self.grads, strict=True):
            tensors += [k, v]
            grads += [gk.to(k.dtype), gv.to(v.dtype)]
        self.grads = []  # the cast copies are all that phase C needs
        torch.autograd.backward(tensors, grads)
        self.release()

    def release(self) -> None:
        """Drop every reference to the prompt graph, the leaves and the buffers."""
        self.prompt_kv, self.leaves, self.grads = [], [], []
