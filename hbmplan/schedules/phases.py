"""The reuse step's phases for one group, each its own function, and :func:`run_group`, which
runs them in order with the participants' hooks around them.

Lifetimes (docs/design.md): the prompt's saved activations are born in A, dormant through B, used
and freed in C; the prompt K/V (:attr:`Prompt.hot`) are born in A and read by every B
microbatch and by C; the gradient cache is born in A, written by every B microbatch, read by C;
a microbatch's activations live and die within its B.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from dataclasses import dataclass

import torch
from torch import nn

from hbmplan.models.adapter import CausalLMAdapter
from hbmplan.models.packed import cu_seqlens_for
from hbmplan.runtime.capture import SavedTensorCapture
from hbmplan.runtime.participant import (
    GroupContext,
    MicrobatchContext,
    Participants,
    StepContext,
)
from hbmplan.runtime.stats import PhaseClock
from hbmplan.runtime.step_plan import GroupPlan
from hbmplan.schedules.filtering import start_filter
from hbmplan.schedules.grad_cache import GradientCache
from hbmplan.schedules.microbatch import (
    LossFn,
    microbatch_loss,
    packed_rows,
    padded_rows,
    response_logprobs,
    token_logprobs,
    unpack_rows,
)
from hbmplan.schedules.router import PrefixRouterLeaves, RouterLoss, routing_sums, with_prefix

__all__ = ["Prompt", "phase_a", "phase_b", "phase_c", "prompt_needs_graph", "run_group"]


def prompt_needs_graph(adapter: CausalLMAdapter) -> bool:
    """Whether phase A must keep a graph: some parameter that requires grad lies outside the LM
    head (the only part of the model the prompt forward never runs; a head tied to the input
    embedding is reached through it). With everything else frozen no prompt K/V can carry a
    gradient, so phase A runs without a graph, keeps no activations, and phase C has nothing
    to do."""
    model: nn.Module = adapter.model
    head = adapter.lm_head
    prefix = next((f"{n}." for n, m in model.named_modules() if m is head), None)
    return any(
        p.requires_grad and not (prefix and name.startswith(prefix))
        for name, p in model.named_parameters(remove_duplicate=False)
    )


@dataclass
class Prompt:
    """What phase A makes and phases B and C use."""

    cache: GradientCache
    """The prompt K/V (in graph, and as leaves for phase B) and their gradient accumulators."""
    leaves: PrefixRouterLeaves | None = None
    """A mixture-of-experts prompt's routing sums, as leaves (``None`` without a router loss)."""

    @property
    def hot(self) -> tuple[torch.Tensor, ...]:
        """What phase B reads: each layer's K and V, and the routing-sum leaves."""
        kv = [t for pair in self.cache.prompt_kv for t in pair]
        return (*kv, *(self.leaves.tensors if self.leaves is not None else ()))

    def release(self) -> None:
        """Drop every reference to the prompt graph, the leaves and the buffers."""
        self.cache.release()
        if self.leaves is not None:
            self.leaves.release()


def phase_a(ctx: GroupContext, parts: Participants, router: RouterLoss | None) -> Prompt:
    """The prompt ``p[:-1]`` at positions ``0..P-2``, once, keeping its graph (if any parameter
    needs it: ``ctx.step.prompt_graph``); each layer's start calls the participants'
    ``on_layer``. Under ``ctx.capture`` when there is one."""
    group, config = ctx.group, ctx.step.config
    n = group.prompt_len - 1
    logits: list[torch.Tensor] = []
    routed = {"router_logits": logits} if router is not None else {}
    capture = ctx.capture.phase("A") if ctx.capture is not None else contextlib.nullcontext()
    graph = contextlib.nullcontext() if ctx.step.prompt_graph else torch.no_grad()
    with parts.layer_hooks(ctx), capture, graph:
        positions = torch.arange(n, device=group.prompt.device)[None]
        kv = ctx.adapter.prompt_kv(group.prompt[None, :-1], positions, **routed)
        prompt = Prompt(GradientCache(kv, config.grad_cache_dtype))
        if router is not None:  # the prompt's routing sums, once
            try:
                sums = routing_sums(router.spec, logits, [n])
                prompt.leaves = PrefixRouterLeaves(sums, config.grad_cache_dtype)
            except BaseException:
                prompt.release()
                raise
    return prompt


def phase_b(
    ctx: MicrobatchContext,
    parts: Participants,
    prompt: Prompt,
    loss_fn: LossFn,
    router: RouterLoss | None,
) -> torch.Tensor:
    """One microbatch: rows ``[p[-1]; r_i[:-1]]`` at positions ``P-1..`` over the prompt K/V
    (packed end to end, or right-padded), the user's loss (plus each trajectory's router loss),
    its backward. Returns the loss, detached."""
    group, step = ctx.group.group, ctx.group.step
    attention, adapter = step.plan.attention, step.adapter
    parts.before_microbatch(ctx)
    if not ctx.microbatch.indices:  # no work: the hooks alone
        parts.before_backward(ctx)
        parts.after_microbatch(ctx)
        return torch.zeros((), device=step.device)
    logits: list[torch.Tensor] = []
    routed = {"router_logits": logits} if router is not None else {}
    seqs = [torch.cat([group.prompt[-1:], t[:-1]]) for t in ctx.targets]
    lengths = [t.numel() for t in ctx.targets]
    indices = ctx.microbatch.indices
    if attention.packed:  # one row, the responses end to end
        starts, rows = list(itertools.accumulate([0, *lengths[:-1]])), sum(lengths)
    else:  # right-padded rows
        starts, rows = [b * max(lengths) for b in range(len(seqs))], len(seqs) * max(lengths)
    filt = start_filter(step.config.token_filter, group, indices, lengths, starts, rows)
    filtering = filt.forward() if filt is not None else contextlib.nullcontext()
    if attention.packed:
        ids, pos = packed_rows(seqs, group.prompt_len - 1)
        # the reference reads the bounds on the host: keep them there (no sync)
        cu = cu_seqlens_for(lengths, step.device if attention.impl == "triton" else "cpu")
        kv = prompt.cache.packed(cu, max(lengths), attention.impl, step.config.deterministic)
        with filtering:
            hidden = adapter.response_hidden(ids, pos, kv, **routed)
        logprobs = token_logprobs(adapter, hidden[0], ctx.targets)
        logits[:] = [unpack_rows(t, lengths) for t in logits]  # router logits as padded rows
    else:
        ids, pos = padded_rows(seqs, group.prompt_len - 1)
        with filtering:
            hidden = adapter.response_hidden(ids, pos, prompt.cache.views(), **routed)
        logprobs = response_logprobs(adapter, hidden, [0] * len(seqs), ctx.targets)
    if filt is not None:
        logprobs = filt.finish(adapter, hidden, logprobs)
        step.stats.filtered_tokens += filt.dropped
    declared = ctx.group.plan.declared if step.config.check_skips else ()
    loss = microbatch_loss(loss_fn, logprobs, group, indices, step.config.check_finite, declared)
    if router is not None:  # each trajectory: prompt sums + its row's
        loss = loss + router(
            with_prefix(prompt.leaves.views(), routing_sums(router.spec, logits, lengths))
        )
    parts.before_backward(dataclasses.replace(ctx, loss=loss))
    loss.backward()
    parts.after_microbatch(ctx)
    return loss.detach()


def phase_c(ctx: GroupContext, parts: Participants, prompt: Prompt) -> None:
    """One backward of the prompt graph from the gradient cache (and a MoE prompt's routing-sum
    gradients)."""
    parts.before_c(ctx)
    leaves = prompt.leaves.backward_pairs() if prompt.leaves is not None else ()
    prompt.cache.backward(leaves)
    parts.after_c(ctx)


def run_group(
    step: StepContext,
    parts: Participants,
    index: int,
    plan: GroupPlan,
    loss_fn: LossFn,
    router: RouterLoss | None,
    clock: PhaseClock,
) -> torch.Tensor:
    """Phases A, B (each microbatch of ``plan``) and C of one group, timed by ``clock``; returns
    the group's loss, detached. The prompt's buffers and capture are released on any exit."""
    adapter, stats = step.adapter, step.stats
    capture = None
    if parts.captures_prompt:
        capture = SavedTensorCapture(step.model_storages(), adapter.layers)
    ctx = GroupContext(step, index, plan, "A", capture)
    prompt = None
    try:
        parts.before_a(ctx)
        with clock.phase("A"):
            prompt = phase_a(ctx, parts, router)
        cache = prompt.cache
        ctx = dataclasses.replace(
            ctx, hot=prompt.hot, kv_bytes=cache.kv_bytes, grad_cache_bytes=cache.nbytes
        )
        parts.after_a(ctx)
        stats.prompt_kv_bytes = max(stats.prompt_kv_bytes, cache.kv_bytes)
        stats.grad_cache_bytes = max(stats.grad_cache_bytes, cache.nbytes)
        total = torch.zeros((), device=step.device)
        b = dataclasses.replace(ctx, phase="B")
        with clock.phase("B"):
            for i, mb in enumerate(plan.microbatches):
                targets = tuple(
                    plan.group.responses[r][: mb.length(k, plan.group)]
                    for k, r in enumerate(mb.indices)
                )
                mctx = MicrobatchContext(b, i, mb, targets)
                total = total + phase_b(mctx, parts, prompt, loss_fn, router).to(total.dtype)
                stats.microbatches += bool(mb.indices)
        with clock.phase("C"):
            phase_c(dataclasses.replace(ctx, phase="C"), parts, prompt)
        return total
    finally:
        if prompt is not None:
            prompt.release()
        if capture is not None:
            capture.release()
