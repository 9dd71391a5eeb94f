"""A linear layer whose backward runs on kept rows only: token filtering's smaller dense GEMMs.

Forward: ``y = x W^T + b`` over every row, exactly as ``F.linear`` (the same call). Backward,
with K the kept rows (out of N): the output gradient's rows outside K are dropped, so

    dW = dy[K]^T x[K]        ([out, K] x [K, in] instead of [out, N] x [N, in])
    dx[K] = dy[K] W,  dx[rows not in K] = 0
    db = sum over K of dy

two GEMMs of K rows each instead of N. :func:`hbmplan.kernels.reference.masked_linear_ref` is
the plain reference: the full-size GEMMs with the dropped rows of dy multiplied by 0. The two
are equal in real arithmetic, and in floating point up to the GEMMs' summation order.

Which rows are kept may be decided after the forward (a rule that reads the log-probs): a
:class:`RowKeep` is filled before the backward runs and read by it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["RowKeep", "filtered_linear", "grad_mask"]


class RowKeep:
    """Which of ``rows`` flattened rows (every dim of an input but the last) keep their
    gradient; set once (:meth:`set`) before the backward that reads it."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.mask: torch.Tensor | None = None
        self._index: torch.Tensor | None = None

    def set(self, mask: torch.Tensor) -> None:
        """mask: bool [rows]."""
        if mask.dtype != torch.bool or mask.shape != (self.rows,):
            raise ValueError(f"a row keep-mask must be bool [{self.rows}], got {mask.dtype} "
                             f"{tuple(mask.shape)}")  # fmt: skip
        self.mask, self._index = mask, None

    def index(self, device: torch.device) -> torch.Tensor:
        """int64 [K] indices of the kept rows (one host sync, once)."""
        if self.mask is None:
            raise RuntimeError("the row keep-mask was not set before the backward")
        if self._index is None or self._index.device != device:
            self._index = self.mask.to(device).nonzero().squeeze(1)
        return self._index

    def matches(self, x: torch.Tensor) -> bool:
        """Whether ``x``'s rows are this microbatch's token rows."""
        return x.dim() >= 2 and x.shape[:-1].numel() == self.rows


class _GatheredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, keep: RowKeep):
        ctx.save_for_backward(x, weight)
        ctx.keep, ctx.has_bias = keep, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        idx = ctx.keep.index(dy.device)
        dy_k = dy.reshape(-1, dy.shape[-1]).index_select(0, idx)  # [K, out]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            flat = dy.new_zeros(x.shape[:-1].numel(), x.shape[-1])
            flat.index_copy_(0, idx, dy_k @ weight.to(dy_k.dtype))
            dx = flat.view(x.shape)
        if ctx.needs_input_grad[1]:
            x_k = x.reshape(-1, x.shape[-1]).index_select(0, idx)  # [K, in]
            dw = (dy_k.t() @ x_k.to(dy_k.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy_k.sum(0)
        return dx, dw, db, None


def filtered_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: RowKeep
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose backward uses the kept rows of ``keep`` only.

    Args:
        x: [..., in], its leading dims flattening to ``keep.rows`` rows.
        weight: [out, in]; bias: [out] or ``None``.
        keep: the rows that keep their gradient (set before the backward).

    Returns:
        [..., out], bitwise ``F.linear``'s.
    """
    return _GatheredLinear.apply(x, weight, bias, keep)


class _GradMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask):
        ctx.mask = mask
        return x.clone()

    @staticmethod
    def backward(ctx, dy):
        mask = ctx.mask
        if isinstance(mask, RowKeep):  # rows of dy, decided after the forward
            if mask.mask is None:
                raise RuntimeError("the row keep-mask was not set before the backward")
            mask = mask.mask.to(dy.device).view(*dy.shape[:-1], 1)
        return dy.masked_fill(~mask, 0), None


def grad_mask(x: torch.Tensor, mask: torch.Tensor | RowKeep) -> torch.Tensor:
    """Identity forward (a copy of ``x``); in backward the gradient is exactly zero where
    ``mask`` is False: a bool tensor broadcastable to ``x``, or a :class:`RowKeep` over ``x``'s
    rows (every dim but the last), read when the backward runs."""
    return _GradMask.apply(x, mask)
