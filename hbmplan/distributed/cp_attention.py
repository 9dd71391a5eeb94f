"""Attention over a prompt split across context-parallel (CP) ranks, on functional collectives.

The prompt ``p[:-1]`` (n tokens) is split by :class:`PromptSplit`; rank r holds the K/V of its
own token slice. Two attentions read the split prompt:

* :class:`SplitPromptAttention` (phase A): the slice's queries, causal over every slice. Each
  layer all-gathers K/V (padded to the longest slice), attends with a position mask, and keeps
  only its local q, k, v for backward: the backward all-gathers K/V again and reduce-scatters
  dK/dV to their owners. So the prompt's saved activations stay 1/CP per rank.
* :class:`SplitPromptResponses` (phase B): one packed microbatch per rank per round, its queries
  over every slice plus its own earlier tokens. ``"pass-q"``: all-gather the queries, attend
  them to the local slice, return each partial output and log-sum-exp to its owner
  (all-to-all); ``"all-gather"``: all-gather the slices' K/V. Partials merge by log-sum-exp;
  the slice's dK/dV land in its owner's gradient cache through the collectives' backward.

Communication per layer and rank (elements received; m: longest slice, t: longest microbatch of
the round, Hq/Hkv heads, D head dim; forward + backward)::

    A               (cp-1) m 2 Hkv D           all-gather K/V, every layer
    C               2 (cp-1) m 2 Hkv D         again, and reduce-scatter dK/dV; every layer but
                                               the last (no K/V depends on its attention output)
    B, pass-q       (cp-1) t Hq (4 D + 2)      Q, (O, lse) and back: S·h per layer and round
    B, all-gather   (cp-1) m 4 Hkv D           K/V and dK/dV: P·kv per layer and round

:func:`exchange_elements` states these; ``"auto"`` takes the smaller of the two B rows. The
partial attention is plain PyTorch math (``[H, T, S]`` scores), on any device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from hbmplan.config import CP_EXCHANGES, CPBalance, CPExchange
from hbmplan.models.packed import LayerAttention, PrefixAttention, as_rows

__all__ = [
    "EXCHANGES",
    "KEY_CHUNK",
    "CPComm",
    "Exchange",
    "PromptSplit",
    "SplitPromptAttention",
    "SplitPromptResponses",
    "choose_exchange",
    "exchange_elements",
    "merge_partials",
    "partial_attention",
    "slice_inputs",
]

Exchange = CPExchange
EXCHANGES = CP_EXCHANGES


# -- the split ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptSplit:
    """Which prompt tokens each CP rank holds.

    ``"zigzag"`` cuts the n tokens into 2·cp chunks (sizes differ by at most one) and gives rank r
    chunks r and 2·cp-1-r, so every rank has the same causal work (early and late tokens);
    ``"contiguous"`` gives rank r the r-th of cp chunks. n need not divide; a rank may hold no
    token (n < cp, e.g. P = 2)."""

    n: int
    cp: int
    balance: CPBalance = "zigzag"

    def _chunks(self, parts: int) -> list[tuple[int, int]]:
        base, extra = divmod(self.n, parts)
        bounds = [0]
        for i in range(parts):
            bounds.append(bounds[-1] + base + (i < extra))
        return list(itertools.pairwise(bounds))

    def indices(self, rank: int) -> list[int]:
        """Token indices (= positions) of rank ``rank``'s slice, ascending."""
        if self.balance == "contiguous":
            lo, hi = self._chunks(self.cp)[rank]
            return list(range(lo, hi))
        chunks = self._chunks(2 * self.cp)
        (a, b), (c, d) = chunks[rank], chunks[2 * self.cp - 1 - rank]
        return [*range(a, b), *range(c, d)]

    @property
    def lengths(self) -> list[int]:
        return [len(self.indices(r)) for r in range(self.cp)]

    @property
    def max_len(self) -> int:
        """The longest slice: what each rank pads to for an all-gather."""
        return max(self.lengths)

    def gathered_order(self) -> torch.Tensor:
        """int64 [n]: the token index of each row of the stripped all-gather (rank-major)."""
        return torch.tensor([i for r in range(self.cp) for i in self.indices(r)], dtype=torch.long)

    def valid_rows(self) -> torch.Tensor:
        """int64 [n]: the rows of a padded all-gather [cp·max_len] that hold real tokens."""
        m = self.max_len
        return torch.tensor(
            [r * m + j for r, length in enumerate(self.lengths) for j in range(length)],
            dtype=torch.long,
        )


# -- collectives, counted -------------------------------------------------------------------
@dataclass
class CPComm:
    """The CP process group, this rank, and the bytes received per phase (``received``)."""

    group: dist.ProcessGroup
    received: dict[str, int] = field(default_factory=dict)
    phase: str = "A"

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def count(self, nbytes: float) -> None:
        self.received[self.phase] = self.received.get(self.phase, 0) + int(nbytes)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[m, ...] from each rank -> [cp·m, ...] (no autograd)."""
        out = _wait(funcol.all_gather_single(x.contiguous(), 0, self.group))
        self.count(x.nbytes * (self.size - 1))
        return out

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """[cp·m, ...] -> the sum over ranks of this rank's [m, ...] block (no autograd)."""
        out = _wait(funcol.reduce_scatter_single(x.contiguous(), "sum", 0, self.group))
        self.count(x.nbytes * (self.size - 1) / self.size)
        return out

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """[cp·m, ...]: block j goes to rank j; returns the blocks received, by sender."""
        out = _wait(funcol.all_to_all_single(x.contiguous(), None, None, self.group))
        self.count(x.nbytes * (self.size - 1) / self.size)
        return out


def _wait(t: torch.Tensor) -> torch.Tensor:
    return t.wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t


class _AllGather(torch.autograd.Function):
    """All-gather forward, reduce-scatter (sum) backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: CPComm) -> torch.Tensor:
        ctx.comm = comm
        return comm.all_gather(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return ctx.comm.reduce_scatter(g), None


class _AllToAll(torch.autograd.Function):
    """All-to-all of equal blocks; its backward is the same exchange of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: CPComm) -> torch.Tensor:
        ctx.comm = comm
        return comm.all_to_all(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return ctx.comm.all_to_all(g), None


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    pad = x.new_zeros((rows - x.shape[0], *x.shape[1:]))
    return torch.cat([x, pad])


# -- partial attention and its merge --------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype.itemsize < 4 else dtype


KEY_CHUNK = 1024
"""Keys per block of :func:`partial_attention`: its working memory is [Hq, T, KEY_CHUNK]."""


def partial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    chunk: int = KEY_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over the keys ``k, v`` alone, with its log-sum-exp.

    Args:
        q: [T, Hq, D]; k, v: [S, Hkv, D] (Hq a multiple of Hkv; S may be 0).
        mask: bool [T, S], True where a query sees a key (every query must see one), or None.
        scale: the softmax scale.
        chunk: keys per block.

    Returns:
        (o [T, Hq, D], lse [T, Hq]) in fp32 for 16-bit inputs, else in q's dtype. With no key
        (S = 0) o is 0 and lse the dtype's lowest value, so the merge gives it no weight.

    Memory: keeps q, k, v, o and lse for backward (never the [Hq, T, S] probabilities: the
    backward recomputes them block by block, as flash attention does); works in [Hq, T, chunk]
    blocks.
    """
    acc = _acc_dtype(q.dtype)
    if k.shape[0] == 0:  # still a function of q, so that the collectives around it stay in graph
        zero = q.to(acc) * 0
        return zero, zero.sum(-1) + torch.finfo(acc).min
    return _PartialAttention.apply(q, k, v, mask, scale, chunk)


def _blocks(S: int, chunk: int):
    return [(a, min(a + chunk, S)) for a in range(0, S, chunk)]


class _PartialAttention(torch.autograd.Function):
    """:func:`partial_attention` in key blocks: two passes forward (log-sum-exp, then output),
    one backward pass recomputing each block's probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, chunk):
        acc = _acc_dtype(q.dtype)
        T, Hq, D = q.shape
        S, Hkv = k.shape[0], k.shape[1]
        qh = q.to(acc).reshape(T, Hkv, Hq // Hkv, D)
        blocks = _blocks(S, chunk)

        def scores(a, b):
            s = torch.einsum("thgd,shd->hgts", qh, k[a:b].to(acc)) * scale
            return s if mask is None else s.masked_fill(~mask[:, a:b], float("-inf"))

        lse = None
        for a, b in blocks:
            part = torch.logsumexp(scores(a, b), dim=-1)  # [Hkv, g, T]
            lse = part if lse is None else torch.logaddexp(lse, part)
        o = 0
        for a, b in blocks:
            p = torch.exp(scores(a, b) - lse[..., None])
            o = o + torch.einsum("hgts,shd->thgd", p, v[a:b].to(acc))
        o = o.reshape(T, Hq, D)
        lse = lse.permute(2, 0, 1).reshape(T, Hq)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mask, ctx.scale, ctx.chunk = mask, scale, chunk
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        mask, scale = ctx.mask, ctx.scale
        acc = o.dtype
        T, Hq, D = q.shape
        S, Hkv = k.shape[0], k.shape[1]
        g = Hq // Hkv

        def heads(x):  # [T, Hq, ...] -> [Hkv, g, T, ...]
            return x.reshape(T, Hkv, g, *x.shape[2:]).movedim(0, 2)

        qh = q.to(acc).reshape(T, Hkv, g, D)
        do = do.to(acc)
        do_h = do.reshape(T, Hkv, g, D)
        # d lse_row / d s = p, and the softmax's own term: rowsum(dO * O)
        delta = heads((do * o).sum(-1) - dlse.to(acc))  # [Hkv, g, T]
        lse_h = heads(lse)
        dq = torch.zeros_like(qh)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for a, b in _blocks(S, ctx.chunk):
            ka, va = k[a:b].to(acc), v[a:b].to(acc)
            s = torch.einsum("thgd,shd->hgts", qh, ka) * scale
            if mask is not None:
                s = s.masked_fill(~mask[:, a:b], float("-inf"))
            p = torch.exp(s - lse_h[..., None])
            dv[a:b] = torch.einsum("hgts,thgd->shd", p, do_h)
            ds = p * (torch.einsum("thgd,shd->hgts", do_h, va) - delta[..., None]) * scale
            dq += torch.einsum("hgts,shd->thgd", ds, ka)
            dk[a:b] = torch.einsum("hgts,thgd->shd", ds, qh)
        return dq.reshape(T, Hq, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention over the union of disjoint key sets from each set's (o [T, H, D], lse [T, H]):
    ``sum_j exp(lse_j - LSE) o_j`` with ``LSE = logsumexp_j lse_j``."""
    lse = torch.stack([p[1] for p in parts])
    total = torch.logsumexp(lse, dim=0)
    out = 0
    for o, part_lse in parts:
        out = out + torch.exp(part_lse - total)[..., None] * o
    return out


# -- volumes --------------------------------------------------------------------------------
def exchange_elements(
    exchange: Literal["pass-q", "all-gather", "prompt-a", "prompt-c"],
    cp: int,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    slice_len: int,
    tokens: int = 0,
) -> int:
    """Elements one rank receives per layer (the module docstring's table): ``"prompt-a"``
    phase A, ``"prompt-c"`` phase C (layers but the last), ``"pass-q"`` / ``"all-gather"`` one
    phase-B round whose longest microbatch has ``tokens`` tokens, forward and backward;
    ``slice_len`` is the longest prompt slice. Times the itemsize (fp32 for 16-bit models'
    phase-B partials) for bytes."""
    kv = (cp - 1) * slice_len * 2 * kv_heads * head_dim
    table = {
        "prompt-a": kv,
        "prompt-c": 2 * kv,
        "pass-q": (cp - 1) * tokens * heads * (4 * head_dim + 2),
        "all-gather": 2 * kv,
    }
    if exchange not in table:
        raise ValueError(f"exchange must be one of {sorted(table)}, got {exchange!r}")
    return table[exchange]


def choose_exchange(
    exchange: Exchange, cp: int, *, heads: int, kv_heads: int, head_dim: int, slice_len: int,
    tokens: int,
) -> Literal["pass-q", "all-gather"]:  # fmt: skip
    """``exchange`` itself, or for ``"auto"`` the phase-B exchange that moves fewer elements
    (pass-q on a tie)."""
    if exchange != "auto":
        return exchange
    shape = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, slice_len=slice_len)
    q = exchange_elements("pass-q", cp, tokens=tokens, **shape)
    kv = exchange_elements("all-gather", cp, tokens=tokens, **shape)
    return "pass-q" if q <= kv else "all-gather"


# -- phase A --------------------------------------------------------------------------------
def _gather_kv(comm: CPComm, split: PromptSplit, valid: torch.Tensor, k, v):
    """Every slice's K/V, [n, Hkv, D] each, in :meth:`PromptSplit.gathered_order` (no autograd)."""
    kv = _pad_rows(torch.cat([k, v], dim=-1), split.max_len)
    full = comm.all_gather(kv).index_select(0, valid.to(kv.device))
    return full.split(k.shape[-1], dim=-1)


def _masked_sdpa(q, K, V, mask, scale):
    """PyTorch SDPA of q [T, Hq, D] over K, V [n, Hkv, D] under a bool mask [T, n] (the
    memory-efficient kernel on CUDA: no [T, n] probabilities kept); [T, Hq, D]."""
    rows = [x.transpose(0, 1)[None] for x in (q, K, V)]
    out = F.scaled_dot_product_attention(*rows, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


class _SplitPromptFn(torch.autograd.Function):
    """Causal attention of a slice's queries over all slices, saving only the local q, k, v."""

    @staticmethod
    def forward(ctx, q, k, v, owner: SplitPromptAttention, scale: float):
        K, V = _gather_kv(owner.comm, owner.split, owner.valid, k, v)
        o = _masked_sdpa(q, K, V, owner.mask.to(q.device), scale)
        ctx.save_for_backward(q, k, v)
        ctx.owner, ctx.scale = owner, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        owner, comm = ctx.owner, ctx.owner.comm
        K, V = _gather_kv(comm, owner.split, owner.valid, k, v)  # again: nothing kept since A
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, K, V)]
            o = _masked_sdpa(*leaves, owner.mask.to(q.device), ctx.scale)
            dq, dK, dV = torch.autograd.grad(o, leaves, do)
        rows = torch.zeros(
            (comm.size * owner.split.max_len, *dK.shape[1:-1], 2 * dK.shape[-1]),
            dtype=dK.dtype,
            device=dK.device,
        )
        rows.index_copy_(0, owner.valid.to(rows.device), torch.cat([dK, dV], dim=-1))
        mine = comm.reduce_scatter(rows)[: k.shape[0]]
        dk, dv = mine.split(k.shape[-1], dim=-1)
        return dq, dk, dv, None, None


@dataclass(eq=False)
class _SplitPromptLayer(LayerAttention):
    owner: SplitPromptAttention

    def attend(self, q, k, v, scale=None):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return _SplitPromptFn.apply(q, k.contiguous(), v.contiguous(), self.owner, scale)


class SplitPromptAttention(PrefixAttention):
    """Phase A's attention on CP rank ``comm.rank``: its slice's queries (positions
    ``split.indices(rank)``), causal over the whole prompt."""

    def __init__(self, comm: CPComm, split: PromptSplit, num_layers: int) -> None:
        self.comm, self.split, self.num_layers = comm, split, num_layers
        self.prefix_len, self.max_seqlen = 0, split.n
        self.valid = split.valid_rows()
        mine = torch.tensor(split.indices(comm.rank), dtype=torch.long)
        if mine.numel():
            self.mask = split.gathered_order()[None, :] <= mine[:, None]  # [T_loc, n]
        else:  # an empty slice runs one stand-in query (see :func:`slice_inputs`): it sees all
            self.mask = torch.ones(1, split.n, dtype=torch.bool)

    def layer(self, index: int) -> LayerAttention:
        return _SplitPromptLayer(self)


def slice_inputs(split: PromptSplit, rank: int, prompt: torch.Tensor):
    """Phase A's (ids [1, T], positions [1, T]) on ``rank``, and how many of its K/V rows are
    real. A rank without a token (n < cp) runs a stand-in token whose K/V nobody reads and
    whose output nobody uses (models cannot run zero tokens): every rank still joins every
    collective."""
    mine = torch.tensor(split.indices(rank), dtype=torch.long, device=prompt.device)
    if mine.numel() == 0:
        return prompt[:1][None], torch.zeros_like(prompt[:1])[None], 0
    return prompt[mine][None], mine[None], mine.numel()


# -- phase B --------------------------------------------------------------------------------
@dataclass(eq=False)
class _ResponsesLayer(LayerAttention):
    owner: SplitPromptResponses
    index: int

    def attend(self, q, k, v, scale=None):
        o = self.owner
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        kp, vp = (as_rows(x) for x in o.kv[self.index])
        parts = [partial_attention(q, k, v, o.own_mask.to(q.device), scale)]
        if o.exchange == "all-gather":
            kv = _pad_rows(torch.cat([kp, vp], dim=-1), o.split.max_len)
            full = _AllGather.apply(kv, o.comm).index_select(0, o.valid.to(kv.device))
            K, V = full.split(kp.shape[-1], dim=-1)
            parts.append(partial_attention(q, K, V, None, scale))
        else:
            qs = _AllGather.apply(_pad_rows(q, o.tokens), o.comm)  # [cp·t, Hq, D]
            out, lse = partial_attention(qs, kp, vp, None, scale)
            packed = _AllToAll.apply(torch.cat([out, lse[..., None]], dim=-1), o.comm)
            packed = packed.view(o.comm.size, o.tokens, *packed.shape[1:])[:, : q.shape[0]]
            parts += [(packed[j, ..., :-1], packed[j, ..., -1]) for j in range(o.comm.size)]
        return merge_partials(parts).to(q.dtype)


class SplitPromptResponses(PrefixAttention):
    """Phase B's attention of one packed microbatch on this CP rank over the split prompt.

    Args:
        comm: the CP group.
        kv: per layer this rank's slice (k, v) [1, Hkv, n_r, D], as the gradient cache's views
            (their backward adds into its buffers).
        split: the prompt's split.
        cu_seqlens: int [N+1] bounds of this rank's packed rows (on the host).
        tokens: the longest microbatch of the round across ranks (pass-q pads to it).
        exchange: ``"pass-q"`` or ``"all-gather"`` (the same on every rank of a round).
    """

    def __init__(self, comm, kv, split, cu_seqlens, tokens, exchange) -> None:
        self.comm, self.kv, self.split, self.tokens = comm, kv, split, tokens
        self.exchange = exchange
        self.num_layers, self.prefix_len = len(kv), split.n
        bounds = cu_seqlens.tolist()
        self.max_seqlen = max(b - a for a, b in itertools.pairwise(bounds))
        T = bounds[-1]
        row = torch.zeros(T, dtype=torch.long)
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            row[a:b] = i
        idx = torch.arange(T)
        self.own_mask = (row[:, None] == row[None, :]) & (idx[None, :] <= idx[:, None])
        self.valid = split.valid_rows()

    def layer(self, index: int) -> LayerAttention:
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer index must lie in [0, {self.num_layers}), got {index}")
        return _ResponsesLayer(self, index)
