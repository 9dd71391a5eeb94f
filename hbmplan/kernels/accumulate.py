"""Accumulate-into: an identity whose backward adds the gradient into a preallocated buffer (the
gradient cache's gK/gV, a MoE prompt's routing sums) instead of producing ``.grad``."""

from __future__ import annotations

import torch

__all__ = ["accumulate_into", "accumulation_dtype"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gradients of ``dtype`` tensors accumulate in: fp32 for 16-bit, else ``dtype``."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class _AccumulateInto(torch.autograd.Function):
    """Identity in forward; backward adds the gradient into ``buffer`` and returns none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        ctx.buffer = buffer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.buffer.add_(grad)
        return None, None


def accumulate_into(x: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged, whose gradient is added into ``buffer`` (same shape, any float dtype, e.g.
    an fp32 gradient cache) in place instead of reaching ``x.grad``. When ``x`` does not require
    grad nothing is ever added.

    Its reference is plain autograd: ``x.grad`` after backward equals what ``buffer`` gains.
    """
    return _AccumulateInto.apply(x, buffer)
