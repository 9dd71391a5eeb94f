"""Pieces both schedules share: splitting rows into microbatches, padded and packed row tensors,
per-token log-probs of responses, and the call of the user's loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from hbmplan.group import Group
from hbmplan.kernels.logprobs import chunk_rows, chunked_token_logprobs, logprob_bytes
from hbmplan.models.adapter import CausalLMAdapter

__all__ = [
    "LossFn",
    "logprob_working_bytes",
    "microbatch_loss",
    "pack_rows",
    "pack_tokens",
    "packed_rows",
    "padded_rows",
    "response_logprobs",
    "token_logprobs",
    "unpack_rows",
]

LossFn = Callable[[torch.Tensor, Group, int], torch.Tensor]
"""``loss_fn(logprobs [S_i], group, i) -> scalar``; differentiable in ``logprobs``."""


def _split_in_order(
    lengths: Sequence[int], budget: int | None, cost: Callable[[list[int]], int]
) -> list[list[int]]:
    """Greedy split of row indices, in order: a microbatch grows while ``cost`` of its rows'
    lengths stays within ``budget``; ``None`` gives one row each; an oversized row runs alone."""
    if budget is None:
        return [[i] for i in range(len(lengths))]
    batches: list[list[int]] = []
    current: list[int] = []
    for i in range(len(lengths)):
        if current and cost([lengths[j] for j in [*current, i]]) > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pack_rows(lengths: Sequence[int], tokens_per_microbatch: int | None) -> list[list[int]]:
    """Split row indices, in order, into microbatches of at most ``tokens_per_microbatch`` padded
    tokens (rows x longest row). ``None`` gives one row per microbatch; a row longer than the
    budget runs alone."""
    return _split_in_order(lengths, tokens_per_microbatch, lambda ns: len(ns) * max(ns))


def pack_tokens(lengths: Sequence[int], tokens_per_microbatch: int | None) -> list[list[int]]:
    """Split row indices, in order, into packed microbatches of at most ``tokens_per_microbatch``
    tokens in total (no padding). ``None`` gives one row per microbatch; a row longer than the
    budget runs alone."""
    return _split_in_order(lengths, tokens_per_microbatch, sum)


def packed_rows(
    seqs: Sequence[torch.Tensor], first_position: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D id tensors end to end: ids [1, T] and positions [1, T], each sequence's positions
    starting at ``first_position`` (T is the sum of the lengths)."""
    device = seqs[0].device
    ids = torch.cat(list(seqs)).to(torch.long)
    positions = torch.cat(
        [torch.arange(first_position, first_position + s.numel(), device=device) for s in seqs]
    )
    return ids[None], positions[None]


def unpack_rows(x: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Packed per-token values [1, T, E] or [T, E] as right-padded rows [B, max(lengths), E]
    (zeros past each row's length); differentiable."""
    flat = x.reshape(-1, x.shape[-1])
    return torch.nn.utils.rnn.pad_sequence(list(flat.split(list(lengths))), batch_first=True)


def padded_rows(
    seqs: Sequence[torch.Tensor], first_position: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D id tensors into ids [B, T] (pad id 0) and positions [B, T] starting at
    ``first_position``. Padding sits after every valid token, so causal attention keeps valid
    queries from seeing it."""
    T = max(s.numel() for s in seqs)
    device = seqs[0].device
    ids = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
    for b, s in enumerate(seqs):
        ids[b, : s.numel()] = s
    positions = torch.arange(first_position, first_position + T, device=device)
    return ids, positions.expand(len(seqs), T)


def response_logprobs(
    adapter: CausalLMAdapter,
    hidden: torch.Tensor,
    starts: Sequence[int],
    targets: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """Per-token log-probs of each row's response.

    Args:
        hidden: [B, T, h] final hidden states of the microbatch rows.
        starts: for row b, the index in the row whose hidden state predicts ``targets[b][0]``.
        targets: row b's response token ids [S_b].

    Returns:
        One tensor [S_b] per row, float32 (float64 for a float64 model), differentiable. The LM
        head runs on response positions only.
    """
    picked = torch.cat(
        [hidden[b, s : s + t.numel()] for b, (s, t) in enumerate(zip(starts, targets, strict=True))]
    )
    return token_logprobs(adapter, picked, targets)


def _plain_linear(head: object) -> bool:
    """A head whose output is exactly ``F.linear(x, weight, bias)``: an ``nn.Linear`` itself (not
    a subclass such as a quantized layer) with no hooks or parametrizations that its forward
    would run and the chunked path would skip."""
    return (
        type(head) is nn.Linear
        and not head._forward_hooks
        and not head._forward_pre_hooks
        and not hasattr(head, "parametrizations")
    )


def logprob_working_bytes(adapter: CausalLMAdapter, n_tokens: int, dtype: torch.dtype) -> int:
    """Device bytes :func:`token_logprobs` of ``n_tokens`` tokens of a ``dtype`` model holds and
    works in at the LM head's backward, chunked or not as it would run
    (:func:`hbmplan.kernels.logprobs.logprob_bytes`, held plus working): the offload planner's
    phase-B estimate."""
    acc = 8 if dtype == torch.float64 else 4
    head = adapter.lm_head
    V, h, chunk = adapter.vocab_size, 0, None
    if _plain_linear(head):
        V, h = head.weight.shape
        chunk = chunk_rows(n_tokens, V, h, dtype.itemsize, acc)
    return sum(logprob_bytes(n_tokens, V, h, dtype.itemsize, acc, chunk))


def token_logprobs(
    adapter: CausalLMAdapter, picked: torch.Tensor, targets: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Per-token log-probs of ``targets`` from the hidden states that predict them.

    Args:
        picked: [N, h], N the total target tokens: row after row, each state predicting the
            next target (a packed microbatch's states are exactly this).
        targets: row b's response token ids [S_b].

    Returns:
        One tensor [S_b] per row, float32 (float64 for a float64 model), differentiable. When
        the adapter exposes its ``lm_head`` (a plain ``nn.Linear``: no subclass, hooks or
        parametrizations), autocast is off, and chunks need less memory than the [N, V]
        log-softmax (:func:`hbmplan.kernels.logprobs.chunk_rows`), they are computed in
        chunks (:func:`hbmplan.kernels.logprobs.chunked_token_logprobs`).
    """
    dtype = torch.float64 if picked.dtype == torch.float64 else torch.float32
    tok = torch.cat(list(targets)).to(picked.device)
    head = adapter.lm_head
    chunk = None
    if _plain_linear(head) and not torch.is_autocast_enabled(picked.device.type):
        # chunks when they need less memory: nothing [N, V] kept
        V, h = head.weight.shape
        chunk = chunk_rows(picked.shape[0], V, h, picked.dtype.itemsize, dtype.itemsize)
    if chunk is None:
        logp = adapter.logits(picked).to(dtype).log_softmax(-1)
        token_logp = logp.gather(-1, tok[:, None]).squeeze(-1)
    else:
        token_logp = chunked_token_logprobs(picked, head.weight, head.bias, tok, chunk, dtype)
    return list(token_logp.split([t.numel() for t in targets]))


def microbatch_loss(
    loss_fn: LossFn,
    logprobs: Sequence[torch.Tensor],
    group: Group,
    indices: Sequence[int],
    check_finite: bool,
    declared: Sequence[int] = (),
) -> torch.Tensor:
    """Sum of ``loss_fn`` over the responses of one microbatch, with the contract checked.

    A response run up to its loss extent (log-probs shorter than ``S_i``) gets ``[S_i]``
    log-probs, the tail as detached zeros. ``declared`` (per response of the group, see
    :mod:`hbmplan.schedules.skipping`), given in the ``check_skips`` debug mode, is checked:
    the loss's gradient with respect to every declared-weightless log-prob must be exactly zero.
    """
    total = None
    for lp, i in zip(logprobs, indices, strict=True):
        S = group.response_lens[i]
        if lp.numel() < S:  # a masked tail that did not run
            lp = torch.cat([lp, lp.new_zeros(S - lp.numel())])
        loss = loss_fn(lp, group, i)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TypeError(f"loss_fn must return a scalar tensor, got {shape} for response {i}")
        if not loss.requires_grad:
            raise ValueError(
                f"loss_fn must return a loss that depends on logprobs, got a constant for "
                f"response {i}"
            )
        if check_finite and not bool(torch.isfinite(loss.detach())):
            raise FloatingPointError(
                f"loss must be finite (check_finite=True), got {loss.item()} for response {i}"
            )
        if declared and declared[i] < S:
            _check_declared(loss, lp, declared[i], i)
        total = loss.reshape(()) if total is None else total + loss.reshape(())
    assert total is not None
    return total


def _check_declared(loss: torch.Tensor, lp: torch.Tensor, extent: int, i: int) -> None:
    """``ValueError`` unless d loss / d lp[extent:] is exactly zero."""
    (grad,) = torch.autograd.grad(loss, lp, retain_graph=True, allow_unused=True)
    if grad is None or not bool(grad[extent:].any()):
        return
    t = extent + int(grad[extent:].ne(0).nonzero()[0])
    what = (
        "inert (loss_fn.inert)" if extent == 0 else f"weightless past token {extent} (loss_extent)"
    )
    raise ValueError(
        f"loss_fn declared response {i} {what}, but its loss has gradient "
        f"{grad[t].item():.3g} at token {t} (check_skips=True); skipping it would change the "
        f"gradients"
    )
