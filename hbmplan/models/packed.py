"""What a packed phase-B microbatch attends to: the shared prompt K/V, read in place.

In a packed microbatch the response rows sit end to end in one row of ``T`` tokens, with
``cu_seqlens`` marking where each begins. Each layer's attention calls
:func:`hbmplan.kernels.prefix_attention` with the prompt's K/V leaves as ``[Pp, Hkv, D]`` views
(never copied, never repeated for GQA) and the gradient cache's buffers as ``grad_cache``, so the
backward adds the prompt's dK/dV straight into them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from hbmplan.kernels.prefix_attention import prefix_attention

__all__ = [
    "KV",
    "KernelImpl",
    "LayerAttention",
    "PackedLayer",
    "PackedPrefix",
    "PrefixAttention",
    "as_rows",
    "cu_seqlens_for",
]

KernelImpl = Literal["triton", "reference"]

KV = tuple[torch.Tensor, torch.Tensor]
"""One layer's (k, v), each ``[1, Hkv, P, D]`` in a schedule (``[P, Hkv, D]`` packed)."""


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """A schedule's ``[1, H, P, D]`` K/V (or gradient buffer) as the kernel's ``[P, H, D]``: a view."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected a [1, H, P, D] tensor, got shape {tuple(x.shape)}")
    return x[0].transpose(0, 1)


class LayerAttention:
    """One layer's attention of a row of packed tokens: ``attend(q [T, Hq, D], k, v [T, Hkv, D],
    scale) -> [T, Hq, D]``, over whatever its :class:`PrefixAttention` holds (the prompt K/V in
    place, or, under context parallel, slices of it on other ranks) and the rows' own tokens."""

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
    ) -> torch.Tensor:
        raise NotImplementedError


class PrefixAttention:
    """What a model forward over one packed row attends through, per layer (``layer(i)``): the
    models take it where they take prefix K/V (``prefix_kv=``, HF's ``hbmplan_prefix``).

    Attributes a subclass provides: ``num_layers``; ``prefix_len``, the prompt keys each query
    sees; ``max_seqlen``, the longest packed row."""

    num_layers: int
    prefix_len: int
    max_seqlen: int

    def layer(self, index: int) -> LayerAttention:
        raise NotImplementedError


@dataclass(frozen=True)
class PackedLayer(LayerAttention):
    """One layer's share of a :class:`PackedPrefix`."""

    prefix: PackedPrefix
    index: int

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
    ) -> torch.Tensor:
        """Attention of the packed rows over the prompt and their own earlier tokens.

        Args:
            q: [T, Hq, D] post-RoPE queries.
            k, v: [T, Hkv, D] the rows' own post-RoPE keys and values.
            scale: softmax scale, default ``D ** -0.5``.

        Returns:
            [T, Hq, D] in q's dtype.
        """
        p = self.prefix
        kp, vp = p.kv[self.index]
        return prefix_attention(
            q,
            kp,
            vp,
            k,
            v,
            p.cu_seqlens,
            grad_cache=p.grad_cache[self.index] if p.grad_cache is not None else None,
            scale=scale,
            impl=p.impl,
            deterministic=p.deterministic,
        )


@dataclass(frozen=True)
class PackedPrefix(PrefixAttention):
    """The prompt K/V a packed microbatch reads, and where their gradients go.

    Attributes:
        kv: per layer (k, v), each [Pp, Hkv, D] (views of the gradient cache's leaves).
        grad_cache: per layer (gk, gv) [Pp, Hkv, D] buffers the backward adds dK/dV into, or
            ``None`` for ordinary autograd gradients on ``kv``; an entry is ``None`` where that
            K or V needs no gradient (its leaf does not require grad).
        cu_seqlens: int32 [N+1] boundaries of the packed rows (0, increasing, T).
        max_seqlen: the longest packed row, in tokens.
        impl: the kernel implementation ("triton" or the PyTorch "reference").
        deterministic: the Triton backward adds the prompt's dK/dV without atomics.
    """

    kv: list[KV]
    grad_cache: list[KV] | None
    cu_seqlens: torch.Tensor
    max_seqlen: int
    impl: KernelImpl = "triton"
    deterministic: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.kv)

    @property
    def prefix_len(self) -> int:
        """Pp, the prompt keys each query sees."""
        return self.kv[0][0].shape[0] if self.kv else 0

    def layer(self, index: int) -> PackedLayer:
        """Layer ``index``'s attention over the prompt."""
        if not 0 <= index < len(self.kv):
            raise IndexError(f"layer index must lie in [0, {len(self.kv)}), got {index}")
        return PackedLayer(self, index)


def cu_seqlens_for(lengths: list[int], device: torch.device | str) -> torch.Tensor:
    """int32 ``cu_seqlens`` [N+1] (0, then running totals) for packed rows of ``lengths``."""
    cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(torch.int32)
    return cu.to(device, non_blocking=True)
