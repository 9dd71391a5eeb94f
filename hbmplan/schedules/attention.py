"""How phase B's response rows attend to the prompt: packed through the prefix-attention kernel,
or right-padded through plain PyTorch attention.

``attention=`` of :func:`hbmplan.schedules.reuse_step` (and :func:`hbmplan.memory`):

* ``"triton"``: packed rows, :func:`hbmplan.kernels.prefix_attention`'s Triton kernel. The prompt
  K/V are read in place (no per-row copy, no GQA repeat, no mask) and the backward adds the
  prompt's dK/dV into the fp32 gradient cache without a prompt-sized temporary.
* ``"reference"``: packed rows through the kernel's PyTorch reference (any device and dtype).
* ``"padded"``: right-padded rows [B, T]; each row concatenates the prompt K/V to its own.
* ``"auto"`` (default): ``"triton"`` on CUDA when the kernel and the model allow it, else
  ``"padded"``.

Packed microbatches count ``tokens_per_microbatch`` as the rows' total tokens (no padding);
padded ones as rows x longest row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from hbmplan.group import Group
from hbmplan.kernels.prefix_attention import triton_unsupported
from hbmplan.models.adapter import CausalLMAdapter, packed_unsupported
from hbmplan.models.packed import KernelImpl
from hbmplan.schedules.grad_cache import accumulation_dtype

__all__ = ["ATTENTIONS", "Attention", "PhaseBAttention", "resolve_attention"]

Attention = Literal["auto", "triton", "reference", "padded"]
ATTENTIONS: tuple[Attention, ...] = ("auto", "triton", "reference", "padded")


@dataclass(frozen=True)
class PhaseBAttention:
    """The resolved choice for one step."""

    impl: KernelImpl | None
    """The kernel implementation for packed rows; ``None`` for padded rows."""
    why: str
    """Why ``"auto"`` chose it (empty when it was asked for)."""

    @property
    def packed(self) -> bool:
        return self.impl is not None

    @property
    def name(self) -> str:
        """The path's name: "triton", "reference" or "padded"."""
        return self.impl or "padded"


def context_len(groups: Sequence[Group]) -> int:
    """The most keys a response query sees: prompt K/V (P - 1) plus the longest response row."""
    return max(g.prompt_len - 1 + max(g.response_lens) for g in groups)


def resolve_attention(
    attention: str,
    adapter: CausalLMAdapter,
    groups: Sequence[Group],
    dtype: torch.dtype,
    grad_cache_dtype: torch.dtype | None,
) -> PhaseBAttention:
    """Resolve ``attention`` for a step, before anything runs.

    Args:
        attention: one of :data:`ATTENTIONS`.
        adapter: the model's adapter (packed rows need ``packed_unsupported`` and ``head_dim``).
        groups: the step's (validated) groups; their device decides ``"auto"``.
        dtype: the model's K/V dtype.
        grad_cache_dtype: the requested gradient-cache dtype (``None``: the default).

    Raises:
        ValueError: ``attention`` is unknown, or the requested path cannot run this model or
            these groups (the message names the rule and the value).
        RuntimeError: ``"triton"`` without Triton, or on the CPU without ``TRITON_INTERPRET=1``.
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if attention == "padded":
        return PhaseBAttention(None, "")
    device = groups[0].prompt.device
    cache_dtype = grad_cache_dtype or accumulation_dtype(dtype)
    reason = packed_unsupported(adapter, context_len(groups))
    head_dim = getattr(adapter, "head_dim", None)
    if reason is None and head_dim is None:
        reason = f"{type(adapter).__name__} does not state its head_dim"
    kernel = None
    if reason is None:
        kernel = triton_unsupported(device, dtype, head_dim, cache_dtype)
    if attention == "auto":
        if device.type != "cuda":
            return PhaseBAttention(None, f"the groups are on {device.type}, not CUDA")
        if reason is not None:
            return PhaseBAttention(None, reason)
        if kernel is not None:
            return PhaseBAttention(None, kernel[1])
        return PhaseBAttention("triton", "")
    if reason is not None:
        raise ValueError(f"attention={attention!r} needs packed rows: {reason}")
    if attention == "triton" and kernel is not None:
        error, message = kernel
        raise error(f"attention='triton' cannot run: {message}")
    return PhaseBAttention(attention, "")
