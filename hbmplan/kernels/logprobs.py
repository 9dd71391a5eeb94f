"""Per-token log-probs of target tokens from final hidden states, without an [N, V] tensor held
for backward when that saves memory.

The plain way (``log_softmax(head(h).float()).gather(targets)``) keeps the fp32 log-softmax
[N, V] alive until backward: for a 152k vocabulary and 8k response tokens, 5 GB per microbatch.
:func:`chunked_token_logprobs` computes the same numbers ``chunk`` rows at a time and keeps only
the hidden states and one logsumexp per token; its backward recomputes each chunk's logits (one
extra LM-head matmul) and adds the chunk's weight gradient into one fp32 buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "LOGITS_BUDGET",
    "chunk_rows",
    "chunked_token_logprobs",
    "logprob_bytes",
    "token_logprobs_ref",
]

LOGITS_BUDGET = 1 << 30
"""Target bytes of one chunk's fp32 [rows, V] logits; see :func:`chunk_rows`."""


def logprob_bytes(
    n_tokens: int,
    vocab: int,
    width: int,
    itemsize: int,
    acc_itemsize: int = 4,
    chunk: int | None = None,
) -> tuple[int, int]:
    """(held, working) device bytes in which the two ways of computing log-probs differ.

    ``held`` lives from the LM head's forward to its backward (the first node of the step's
    backward): the plain formula's [N, V] log-softmax, N V acc bytes, or the chunks' [N]
    logsumexps, N acc. ``working`` is the most the backward adds on top of it: for the plain
    formula the logits in the model dtype and two [N, V] gradients, N V (itemsize + 2 acc); for
    chunks of ``chunk`` rows the same for one chunk plus the LM-head weight gradient accumulated
    in fp32 and cast, chunk V (itemsize + 2 acc) + V h (acc + itemsize). Both ways also hold the
    [N, h] hidden states and the [N] int64 targets (not counted here).

    Args:
        n_tokens: N. vocab: V (the head's rows). width: h. itemsize: the model dtype's bytes.
        acc_itemsize: the log-softmax dtype's bytes (4; 8 for an fp64 model).
        chunk: rows per chunk, or ``None`` for the plain formula.
    """
    if chunk is None:
        return n_tokens * vocab * acc_itemsize, n_tokens * vocab * (itemsize + 2 * acc_itemsize)
    rows = min(chunk, n_tokens)
    working = rows * vocab * (itemsize + 2 * acc_itemsize) + vocab * width * (
        acc_itemsize + itemsize
    )
    return n_tokens * acc_itemsize, working


def chunk_rows(
    n_tokens: int, vocab: int, width: int, itemsize: int, acc_itemsize: int = 4
) -> int | None:
    """Rows per chunk for the log-probs of ``n_tokens`` tokens, or ``None`` for the plain formula.

    Chunks hold [rows, V] in ``acc_itemsize`` bytes within :data:`LOGITS_BUDGET` (one chunk of
    all N rows when N is below that). Chunking is chosen when it needs less memory at the LM
    head's backward, held plus working bytes of :func:`logprob_bytes`, than the plain formula.
    Those are the bytes the choice adds to the step's peak, since the held ones are freed
    before any layer's backward runs, and each way's total never falls as N grows, so neither
    does the chosen one: a longer microbatch never needs less memory (the capacity frontier
    relies on it).

    Args:
        n_tokens: N. vocab: V (the head's rows). width: h. itemsize: the model dtype's bytes.
        acc_itemsize: the log-softmax dtype's bytes (4; 8 for an fp64 model).
    """
    rows = min(max(1, LOGITS_BUDGET // (vocab * acc_itemsize)), max(1, n_tokens))
    plain = sum(logprob_bytes(n_tokens, vocab, width, itemsize, acc_itemsize))
    chunked = sum(logprob_bytes(n_tokens, vocab, width, itemsize, acc_itemsize, rows))
    return rows if chunked < plain else None


def token_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    dtype: torch.dtype,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The plain formula: ``log_softmax(linear(hidden).to(dtype) / temperature).gather(targets)``;
    [N]."""
    logp = (F.linear(hidden, weight, bias).to(dtype) / temperature).log_softmax(-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1)


def _scaled(logits: torch.Tensor, inv_t: float) -> torch.Tensor:
    """``logits / temperature`` in place (the chunk's own buffer); nothing at temperature 1."""
    return logits if inv_t == 1.0 else logits.mul_(inv_t)


class _ChunkedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, dtype, temperature, entropy):
        n = hidden.shape[0]
        inv_t = 1.0 / temperature
        out = torch.empty(n, dtype=dtype, device=hidden.device)
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            logits = _scaled(F.linear(hidden[lo:hi], weight, bias).to(dtype), inv_t)
            lse[lo:hi] = logits.logsumexp(-1)
            out[lo:hi] = logits.gather(-1, targets[lo:hi, None]).squeeze(-1) - lse[lo:hi]
            if entropy is not None:  # H = lse - sum(p * logits), no gradient
                p = (logits - lse[lo:hi, None]).exp_()
                entropy[lo:hi] = lse[lo:hi] - (p * logits).sum(-1)
                del p
            del logits  # before the next chunk's
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.inv_t = chunk, inv_t
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        n = hidden.shape[0]
        for lo in range(0, n, ctx.chunk):
            hi = min(lo + ctx.chunk, n)
            g = grad[lo:hi, None]
            # d logsoftmax: onehot(target) g - softmax g, in place on the chunk's logits (one
            # [rows, V] buffer in the log-softmax dtype), then back to the weight's dtype
            # (and the chain rule of logits / temperature: one more factor 1 / temperature)
            dlogits = _scaled(F.linear(hidden[lo:hi], weight, bias).to(lse.dtype), ctx.inv_t)
            dlogits.sub_(lse[lo:hi, None]).exp_().mul_(-g)
            dlogits.scatter_add_(-1, targets[lo:hi, None], g)
            dlogits = _scaled(dlogits, ctx.inv_t).to(weight.dtype)
            if need_h:
                dh[lo:hi] = dlogits @ weight
            if need_w:
                dw.add_(dlogits.t() @ hidden[lo:hi])
            if need_b:
                db.add_(dlogits.sum(0))
            del dlogits  # before the next chunk's logits
        return (
            dh,
            dw.to(weight.dtype) if need_w else None,
            db.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
            None,
            None,
        )


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk: int,
    dtype: torch.dtype = torch.float32,
    temperature: float = 1.0,
    entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`token_logprobs_ref` computed ``chunk`` rows at a time.

    Args:
        hidden: [N, h] final hidden states, each predicting the target in its row.
        weight: [V, h] LM-head weight; bias: [V] or ``None``.
        targets: [N] int64 target token ids.
        chunk: rows per chunk (>= 1).
        dtype: the log-softmax dtype (fp32; fp64 for an fp64 model).
        temperature: the logits are divided by it before the log-softmax (TRL's sampling
            temperature; > 0).
        entropy: an [N] ``dtype`` tensor to fill with each token's entropy of the
            temperature-scaled distribution (no gradient), or ``None``.

    Returns:
        [N] log-probs in ``dtype``, differentiable in hidden, weight and bias. Held for backward:
        hidden, targets and [N] logsumexps; the backward's transients are [chunk, V].
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, h] and weight [V, h], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if entropy is not None and (entropy.shape != targets.shape or entropy.dtype != dtype):
        raise ValueError(
            f"entropy must be a {dtype} tensor of shape {tuple(targets.shape)}, got "
            f"{entropy.dtype} {tuple(entropy.shape)}"
        )
    return _ChunkedLogProbs.apply(
        hidden, weight, bias, targets, chunk, dtype, float(temperature), entropy
    )
