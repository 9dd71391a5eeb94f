"""Router losses of mixture-of-experts models, with logical prefix-token accounting: the reuse
schedule reproduces the dense trainer's load-balancing and z-losses without dispatching the prompt
G times.

**Dense semantics matched.** The dense trainer runs each trajectory ``[p; r_i[:-1]]`` (T_i =
P + S_i - 1 tokens) as one forward, as a Hugging Face model computes its auxiliary loss over one
forward, and adds ``aux_coef * aux_i + z_coef * z_i`` per trajectory to the loss it
back-propagates ("per-trajectory"). With routing sums of the trajectory's tokens per router layer
l -- counts ``c[l, e]`` of (token, slot) pairs routed to expert e (constants), probability sums
``s[l, e]`` (differentiable) and ``z[l] = sum_t logsumexp(logits_t)^2`` -- every load-balancing
formula of :class:`hbmplan.models.moe.RouterSpec` is ``aux_i = sum(w(c, T_i) * s)`` with
constant weights ``w``, and ``z_i = sum_l z[l] / T_i``.

**Logical prefix-token accounting.** A trajectory's tokens are exactly the prompt tokens
``p[:-1]`` (phase A) plus its phase-B row ``[p[-1]; r_i[:-1]]``, and routing sums add over token
sets: trajectory i's sums are ``prompt + row_i``. Phase A computes the prompt's sums once; its
differentiable part becomes a leaf whose gradient accumulates over every trajectory of the group
(so the prompt counts G times, once per trajectory, as in the dense trainer) and flows back in
phase C with the K/V gradients.

**Global batch** ("global-batch"): one loss over every trajectory of the step, prompt tokens
weighted G per group: ``aux = sum(w(C, N) * S)`` with C, S the step's summed counts and
probability sums and N its token count; ``z = sum_l Z[l] / N``. Being linear in S with constant
weights, it is the sum over trajectories of ``sum(w(C, N) * s_i)``, which both schedules add per
trajectory once C is known: a counting pass (forward only, no autograd graph) over the step's
microbatches comes first, so the prompt passes through the experts twice per step in the reuse
schedule (2G times in the dense one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from hbmplan.config import ROUTER_LOSS_MODES, RouterLossMode
from hbmplan.group import Group
from hbmplan.kernels.accumulate import accumulate_into, accumulation_dtype
from hbmplan.models.moe import RouterSpec, router_probs
from hbmplan.runtime.stats import RouterStepStats
from hbmplan.schedules.microbatch import pack_rows, padded_rows

__all__ = [
    "ROUTER_LOSS_MODES",
    "PrefixRouterLeaves",
    "RouterLoss",
    "RouterLossMode",
    "RoutingSums",
    "balance_weights",
    "count_dense",
    "count_reuse",
    "resolve_router_loss",
    "routing_sums",
    "with_prefix",
]


def resolve_router_loss(mode: str, spec: RouterSpec | None) -> RouterSpec | None:
    """The router loss a step trains with: ``spec`` unless ``mode`` is "off".

    "per-trajectory" (the default) is a no-op for a model without a router loss; asking for
    "global-batch" on such a model is an error, since nothing would be balanced.
    """
    if mode not in ROUTER_LOSS_MODES:
        raise ValueError(
            f"router_loss must be 'per-trajectory', 'global-batch' or 'off', got {mode!r}"
        )
    if mode == "global-batch" and spec is None:
        raise ValueError(
            "router_loss='global-batch' needs a model whose router loss is on (a MoE model with "
            "a positive aux coefficient; Hugging Face: config.output_router_logits=True and "
            "router_aux_loss_coef > 0), got a model without one"
        )
    return None if mode == "off" else spec


@dataclass
class RoutingSums:
    """Routing sums of B token sets (rows), per router layer; they add over disjoint sets.

    Attributes:
        counts: int64 [B, L, E] (token, slot) pairs routed to each expert (a constant).
        prob_sums: [B, L, E] sums of router probabilities (float32, float64 for fp64 logits),
            differentiable.
        z_sums: [B, L] sums of logsumexp(logits)^2, or ``None`` when no z-loss is trained.
        tokens: tokens of each set (length B).
    """

    counts: torch.Tensor
    prob_sums: torch.Tensor
    z_sums: torch.Tensor | None
    tokens: list[int]


def routing_sums(
    spec: RouterSpec, logits: Sequence[torch.Tensor], lengths: Sequence[int]
) -> RoutingSums:
    """Routing sums of right-padded rows from one forward's router logits.

    Args:
        logits: per router layer [B, T, E] or [B*T, E] (as Hugging Face records them).
        lengths: valid tokens of each of the B rows; positions past them are padding and count
            nowhere.
    """
    B, E = len(lengths), spec.num_experts
    if not logits:
        raise ValueError("a MoE forward must record router logits, got none")
    assert all(t.dim() == 2 or t.shape[0] == B for t in logits), "one row of logits per length"
    lg = torch.stack([t.reshape(B, -1, E) for t in logits], dim=1)  # [B, L, T, E]
    lens = torch.tensor(list(lengths), device=lg.device)
    valid = torch.arange(lg.shape[2], device=lg.device)[None, :] < lens[:, None]  # [B, T]
    acc = accumulation_dtype(lg.dtype)
    probs = router_probs(lg, spec.softmax_dtype)
    chosen = probs.detach().topk(spec.top_k, dim=-1).indices  # [B, L, T, k]
    per_slot = valid[:, None, :, None].expand_as(chosen).to(torch.int64)
    counts = torch.zeros(*lg.shape[:2], E, dtype=torch.int64, device=lg.device).scatter_add_(
        2, chosen.flatten(2), per_slot.flatten(2)
    )
    prob_sums = torch.where(valid[:, None, :, None], probs.to(acc), 0).sum(2)
    z_sums = None
    if spec.z_coef > 0:
        lse = lg.to(acc).logsumexp(-1)  # [B, L, T]
        z_sums = torch.where(valid[:, None, :], lse * lse, 0).sum(2)
    return RoutingSums(counts, prob_sums, z_sums, list(lengths))


def with_prefix(prefix: RoutingSums, rows: RoutingSums) -> RoutingSums:
    """Each row's trajectory: the one shared prefix set (B = 1) plus the row's own tokens."""
    z = None
    if rows.z_sums is not None:
        assert prefix.z_sums is not None
        z = prefix.z_sums + rows.z_sums
    return RoutingSums(
        counts=prefix.counts + rows.counts,
        prob_sums=prefix.prob_sums + rows.prob_sums,
        z_sums=z,
        tokens=[prefix.tokens[0] + n for n in rows.tokens],
    )


def balance_weights(spec: RouterSpec, counts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Weights w with ``load-balancing loss = sum(w * s)`` for float counts [..., L, E] of token
    sets with ``tokens`` [...] tokens each (see :attr:`RouterSpec.load_balancing`)."""
    n2 = (tokens * tokens)[..., None, None]
    if spec.load_balancing == "per-layer":
        return counts * (spec.num_experts / spec.top_k) / n2
    L = counts.shape[-2]
    total = counts.sum(-2, keepdim=True) * spec.num_experts / (L * L)
    return (total / n2).expand_as(counts)


class RouterLoss:
    """The router-loss term of a step's microbatches, and what the step records of it.

    Call it on each microbatch's trajectory sums; it returns the term to add to the loss before
    backward and accumulates the counts and values :meth:`report` returns. For "global-batch",
    :meth:`set_global` gives the step's counts first.
    """

    def __init__(self, spec: RouterSpec, mode: Literal["per-trajectory", "global-batch"]) -> None:
        self.spec, self.mode = spec, mode
        self._global: tuple[torch.Tensor, int] | None = None
        self._counts: torch.Tensor | None = None
        self._aux: torch.Tensor | None = None
        self._z: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None

    def set_global(self, counts: torch.Tensor, tokens: int) -> None:
        """The step's counts int64 [L, E] (prompt counts x G per group) and its token count."""
        self._global = (counts, tokens)

    def __call__(self, traj: RoutingSums) -> torch.Tensor:
        """Sum over the B trajectories of ``aux_coef * aux + z_coef * z`` (scalar)."""
        spec, dtype = self.spec, traj.prob_sums.dtype
        if self.mode == "per-trajectory":
            n = torch.tensor(traj.tokens, dtype=dtype, device=traj.prob_sums.device)
            w = balance_weights(spec, traj.counts.to(dtype), n)
            z_den = n[:, None]
        else:
            assert self._global is not None, "global-batch needs the counting pass first"
            counts, tokens = self._global
            n = torch.tensor(float(tokens), dtype=dtype, device=counts.device)
            w = balance_weights(spec, counts.to(dtype), n)[None]
            z_den = n
        aux = (w * traj.prob_sums).sum()
        loss = spec.aux_coef * aux
        z = None
        if spec.z_coef > 0:
            assert traj.z_sums is not None
            z = (traj.z_sums / z_den).sum()
            loss = loss + spec.z_coef * z
        self._record(traj.counts.sum(0), aux.detach(), None if z is None else z.detach(), loss)
        return loss

    def _record(self, counts, aux, z, loss) -> None:
        add = lambda a, b: b if a is None else a + b  # noqa: E731
        self._counts = add(self._counts, counts)
        self._aux = add(self._aux, aux)
        self._z = z if z is None else add(self._z, z)
        self._loss = add(self._loss, loss.detach())

    def report(self) -> RouterStepStats:
        assert self._counts is not None and self._aux is not None and self._loss is not None
        return RouterStepStats(
            mode=self.mode,
            loss=self._loss,
            aux_loss=self._aux,
            z_loss=self._z,
            expert_tokens=self._counts,
        )


class PrefixRouterLeaves:
    """The prompt's routing sums for phase B: detached leaves whose gradients accumulate in place
    into buffers across microbatches (like the gK/gV gradient cache), handed to phase C's
    backward with the K/V.

    Args:
        prompt: the prompt's sums (B = 1), still attached to the prompt graph.
        dtype: accumulation dtype; default :func:`accumulation_dtype` of the sums' dtype.

    Memory: ``L * E`` (+ ``L`` with a z-loss) values, twice. A sum without a graph (every
    parameter before it frozen) needs no gradient: its leaf does not require grad and its
    buffer is ``None``.
    """

    def __init__(self, prompt: RoutingSums, dtype: torch.dtype | None = None) -> None:
        self.prompt: RoutingSums | None = prompt
        graph = [t for t in (prompt.prob_sums, prompt.z_sums) if t is not None]
        self.leaves = [t.detach().requires_grad_(t.requires_grad) for t in graph]
        self.grads = [
            torch.zeros_like(t, dtype=dtype or accumulation_dtype(t.dtype))
            if t.requires_grad
            else None
            for t in graph
        ]

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The leaves (phase B reads them: hot for the offload planner)."""
        return list(self.leaves)

    def views(self) -> RoutingSums:
        """The prompt's sums for one microbatch; their gradients accumulate into the buffers."""
        assert self.prompt is not None, "the leaves were released"
        views = [
            t if g is None else accumulate_into(t, g)
            for t, g in zip(self.leaves, self.grads, strict=True)
        ]
        return RoutingSums(
            counts=self.prompt.counts,
            prob_sums=views[0],
            z_sums=views[1] if len(views) > 1 else None,
            tokens=self.prompt.tokens,
        )

    def backward_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(prompt-graph tensor, accumulated gradient) pairs for phase C; releases the leaves."""
        assert self.prompt is not None, "the leaves were released"
        graph = [t for t in (self.prompt.prob_sums, self.prompt.z_sums) if t is not None]
        pairs = [
            (t, g.to(t.dtype)) for t, g in zip(graph, self.grads, strict=True) if g is not None
        ]
        self.release()
        return pairs

    def release(self) -> None:
        """Drop every reference to the prompt graph, the leaves and the buffers."""
        self.prompt = None
        self.leaves, self.grads = [], []


@torch.no_grad()
def count_dense(
    adapter, spec: RouterSpec, groups: Sequence[Group], tokens_per_microbatch: int | None
) -> tuple[torch.Tensor, int]:
    """The counting pass of the dense trainer: the step's counts int64 [L, E] and tokens, from
    forwards (no graph) of the same microbatches the step trains."""
    total, tokens = None, 0
    for group in groups:
        lengths = [group.trajectory_len(i) for i in range(group.group_size)]
        for indices in pack_rows(lengths, tokens_per_microbatch):
            rows = [torch.cat([group.prompt, group.responses[i][:-1]]) for i in indices]
            ids, pos = padded_rows(rows, 0)
            logits: list[torch.Tensor] = []
            adapter.full_hidden(ids, pos, router_logits=logits)
            counts = routing_sums(spec, logits, [lengths[i] for i in indices]).counts.sum(0)
            total = counts if total is None else total + counts
        tokens += sum(lengths)
    assert total is not None
    return total, tokens


@torch.no_grad()
def count_reuse(
    adapter, spec: RouterSpec, groups: Sequence[Group], tokens_per_microbatch: int | None
) -> tuple[torch.Tensor, int]:
    """The counting pass of the reuse schedule: the prompt once per group (its counts weighted
    G), then the group's response microbatches over its K/V; no graph is kept."""
    total, tokens = None, 0
    for group in groups:
        P, G = group.prompt_len, group.group_size
        logits: list[torch.Tensor] = []
        positions = torch.arange(P - 1, device=group.prompt.device)[None]
        kv = adapter.prompt_kv(group.prompt[None, :-1], positions, router_logits=logits)
        prompt = routing_sums(spec, logits, [P - 1]).counts[0]
        counts = prompt * G
        boundary = group.prompt[-1:]
        for indices in pack_rows(group.response_lens, tokens_per_microbatch):
            rows = [torch.cat([boundary, group.responses[i][:-1]]) for i in indices]
            ids, pos = padded_rows(rows, P - 1)
            logits = []
            adapter.response_hidden(ids, pos, kv, router_logits=logits)
            lens = [group.response_lens[i] for i in indices]
            counts = counts + routing_sums(spec, logits, lens).counts.sum(0)
        total = counts if total is None else total + counts
        tokens += G * (P - 1) + sum(group.response_lens)
    assert total is not None
    return total, tokens
