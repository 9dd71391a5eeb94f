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

import torch

from hbmplan.config import ATTENTIONS, Attention
from hbmplan.group import Group
from hbmplan.kernels.accumulate import accumulation_dtype
from hbmplan.kernels.prefix_attention import triton_unsupported
from hbmplan.models.adapter import CausalLMAdapter
from hbmplan.runtime.step_plan import PhaseBAttention

__all__ = ["ATTENTIONS", "Attention", "PhaseBAttention", "auto_attention", "resolve_attention"]


def context_len(groups: Sequence[Group]) -> int:
    """The most keys a response query sees: prompt K/V (P - 1) plus the longest response row."""
    return max(g.prompt_len - 1 + max(g.response_lens) for g in groups)


def auto_attention(
    device_type: str, packed_reason: str | None, kernel_reason: str | None
) -> PhaseBAttention:
    """What ``attention="auto"`` runs: the Triton kernel over packed rows when the step is on
    CUDA, the model can pack (``packed_reason is None``) and the kernel takes the shapes and
    dtypes (``kernel_reason is None``); otherwise padded rows, saying why. The one statement of
    the rule: the schedule and the frontier's byte model both resolve "auto" here."""
    if device_type != "cuda":
        return PhaseBAttention(None, f"the groups are on {device_type}, not CUDA")
    if packed_reason is not None:
        return PhaseBAttention(None, packed_reason)
    if kernel_reason is not None:
        return PhaseBAttention(None, kernel_reason)
    return PhaseBAttention("triton", "")


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
    reason = adapter.packed_unsupported(context_len(groups))
    if reason is None and adapter.head_dim is None:
        reason = f"{type(adapter).__name__} does not state its head_dim"
    kernel = None
    if reason is None:
        kernel = triton_unsupported(device, dtype, adapter.head_dim, cache_dtype)
    if attention == "auto":
        return auto_attention(device.type, reason, kernel[1] if kernel is not None else None)
    if reason is not None:
        raise ValueError(f"attention={attention!r} needs packed rows: {reason}")
    if attention == "triton" and kernel is not None:
        error, message = kernel
        raise error(f"attention='triton' cannot run: {message}")
    return PhaseBAttention(attention, "")
