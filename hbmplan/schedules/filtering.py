"""Collider-style token filtering in a microbatch's backward (docs/filtering.md has the
definition and why it holds).

Forward unchanged. Then, for the response positions a :class:`hbmplan.token_filter.TokenFilter`
drops (position ``P-1+t`` of a trajectory predicts ``r[t]``; the prompt's positions are never
dropped): (1) the log-prob of a dropped token gets zero gradient; (2) every linear layer of the
decoder (every ``F.linear`` over the microbatch's token rows during the forward of the decoder
layers) back-propagates from its kept rows only. Every other op of a decoder layer is row-wise
except attention, whose dK/dV at dropped positions (sent there by kept queries) stop at the
K/V projections by (2); so by induction from the top every activation at a dropped position
gets exactly zero gradient in every layer, and each weight gradient sums over kept rows only.

``impl="gather"`` runs (2) as smaller dense GEMMs on the gathered kept rows
(:func:`hbmplan.kernels.filtered_linear.filtered_linear`); ``impl="reference"`` masks the
output gradient and runs the full-size GEMMs (:func:`hbmplan.kernels.reference.masked_linear_ref`).
A microbatch whose responses the filter keeps whole before the forward (``keeps_all``) runs the
ordinary backward, bitwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hbmplan.group import Group
from hbmplan.kernels.filtered_linear import RowKeep, filtered_linear, grad_mask
from hbmplan.models.adapter import CausalLMAdapter
from hbmplan.token_filter import FilterImpl, TokenFilter

__all__ = ["MicrobatchFilter", "check_filter", "entropy_of", "filtered_rows", "start_filter"]

_ENTROPY_ROWS = 1024


class _LinearRows(TorchFunctionMode):
    """Routes ``F.linear`` over the microbatch's token rows through the filtered backward."""

    def __init__(self, keep: RowKeep, impl: FilterImpl) -> None:
        super().__init__()
        self.keep, self.impl = keep, impl

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and self.keep.matches(args[0]):
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
                if self.impl == "gather":
                    return filtered_linear(x, weight, bias, self.keep)
                return grad_mask(F.linear(x, weight, bias), self.keep)
        return func(*args, **kwargs)


@contextmanager
def filtered_rows(keep: RowKeep, impl: FilterImpl = "gather"):
    """Inside, every ``F.linear`` over ``keep.rows`` token rows that needs a gradient runs with
    the filtered backward (``impl`` "gather" or the masked "reference"). Set ``keep`` before
    the backward."""
    with _LinearRows(keep, impl):
        yield


def entropy_of(adapter: CausalLMAdapter, hidden: torch.Tensor) -> torch.Tensor:
    """Predictive entropy [N] (float32, no graph) of final hidden states [N, h], in chunks."""
    with torch.no_grad():
        out = []
        for rows in hidden.split(_ENTROPY_ROWS):
            logp = adapter.logits(rows).float().log_softmax(-1)
            out.append(-(logp.exp() * logp).sum(-1))
        return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


@dataclass
class MicrobatchFilter:
    """One microbatch's filtering: its responses' rows in the flattened token layout."""

    token_filter: TokenFilter
    group: Group
    indices: tuple[int, ...]
    starts: tuple[int, ...]
    """Flat row of each response's first token position (the one predicting ``r[0]``)."""
    lengths: tuple[int, ...]
    """Tokens each response runs."""
    keep: RowKeep
    always: tuple[tuple[int, int], ...] = ()
    """Flat row ranges that always keep their gradient (the dense trainer's prompt rows)."""
    dropped: int = 0
    """Response tokens dropped (after :meth:`finish`)."""

    @contextmanager
    def forward(self):
        """The decoder's forward over the microbatch's rows runs inside this."""
        with filtered_rows(self.keep, self.token_filter.impl):
            yield

    def finish(
        self, adapter: CausalLMAdapter, hidden: torch.Tensor, logprobs: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Decide the keep-masks from the forward's results, set the rows, and return the
        log-probs with zero gradient at dropped tokens.

        Args:
            hidden: the forward's final hidden states, [B, T, h] in the layout ``starts`` index.
            logprobs: each response's run log-probs [n_k], differentiable.
        """
        flat = hidden.reshape(-1, hidden.shape[-1])
        mask = torch.zeros(self.keep.rows, dtype=torch.bool, device=flat.device)
        for lo, hi in self.always:
            mask[lo:hi] = True
        out = []
        for k, (i, lp) in enumerate(zip(self.indices, logprobs, strict=True)):
            s, n = self.starts[k], self.lengths[k]
            kept = self.token_filter.keep(
                self.group, i, lp.detach(), lambda s=s, n=n: entropy_of(adapter, flat[s : s + n])
            )
            if not isinstance(kept, torch.Tensor) or kept.dtype != torch.bool or kept.shape != (n,):
                got = (kept.dtype, tuple(kept.shape)) if isinstance(kept, torch.Tensor) else kept
                raise ValueError(
                    f"token_filter.keep must return a bool tensor [{n}] for response {i}, got {got}"
                )
            kept = kept.to(flat.device)
            mask[s : s + n] = kept
            self.dropped += n - int(kept.sum())
            out.append(grad_mask(lp, kept))
        self.keep.set(mask)
        return out


def check_filter(token_filter: TokenFilter | None, router: object) -> None:
    """``ValueError`` for a filter the step cannot run: with a mixture-of-experts router loss
    (``router`` not ``None``) a dropped token would still carry a router gradient."""
    if token_filter is not None and router is not None:
        raise ValueError(
            "token_filter cannot run with a router loss on (a dropped token still has a router "
            "gradient); pass router_loss='off' or no token_filter"
        )


def start_filter(
    token_filter: TokenFilter | None,
    group: Group,
    indices: Sequence[int],
    lengths: Sequence[int],
    starts: Sequence[int],
    rows: int,
    always: Sequence[tuple[int, int]] = (),
) -> MicrobatchFilter | None:
    """The microbatch's filtering, or ``None`` when there is none to do (no filter, or it keeps
    every response whole: the ordinary backward runs)."""
    if token_filter is None or all(token_filter.keeps_all(group, i) for i in indices):
        return None
    return MicrobatchFilter(
        token_filter, group, tuple(indices), tuple(starts), tuple(lengths), RowKeep(rows),
        tuple(always),
    )  # fmt: skip
