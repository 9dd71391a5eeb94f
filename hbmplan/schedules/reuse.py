"""The shared-prefix reuse schedule: prompt forward once (A), responses as ordinary microbatches
that read the prompt K/V and accumulate gK/gV (B), prompt backward once (C).

For a group with prompt ``p`` (length P) and responses ``r_i`` (lengths S_i):

* A: the model runs ``p[:-1]`` at positions ``0..P-2`` and keeps each layer's post-RoPE K/V in
  the autograd graph.
* B: each microbatch runs rows ``[p[-1]; r_i[:-1]]`` at positions ``P-1..P+S_i-2``, attending to
  the prompt K/V and to their own earlier tokens; the log-probs of ``r_i`` go to the user's loss
  and the microbatch runs backward. Parameter gradients accumulate as usual, gK/gV in the
  gradient cache. Rows are packed end to end for the prefix-attention kernel, or right-padded
  for plain PyTorch attention (see :mod:`hbmplan.schedules.attention`).
* C: one backward of the prompt graph from the gradient cache.

In real arithmetic this equals the dense trainer's gradients: the prompt's forward does not
depend on the responses, and gradients are linear.

For a mixture-of-experts model with a router loss, phase A also computes the prompt's routing
sums once; phase B adds each trajectory's router loss from prompt + row sums, and phase C
back-propagates the prompt sums' accumulated gradient with gK/gV (see
:mod:`hbmplan.schedules.router`).

:func:`run_step` is the driver: it fixes the step's structure (:func:`plan_step`), then runs
each group's phases (:mod:`hbmplan.schedules.phases`) with the participants' hooks around them
(:mod:`hbmplan.runtime.participant`). Everything else that acts between phases (offload,
recompute, the probe, byte metering, NVTX) is a participant.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence

import torch
from torch import nn

from hbmplan.config import Attention, ReuseConfig, RouterLossMode, config_or_keywords
from hbmplan.group import Group, validate_groups
from hbmplan.models.adapter import CausalLMAdapter, adapt, model_device
from hbmplan.models.tensor_parallel import tensor_parallel_degree
from hbmplan.runtime import ByteMeter, NvtxRanges, offload_participants
from hbmplan.runtime.participant import Participant, Participants, StepContext
from hbmplan.runtime.stats import PhaseClock, StepStats
from hbmplan.schedules.filtering import check_filter
from hbmplan.schedules.microbatch import LossFn
from hbmplan.schedules.phases import prompt_needs_graph, run_group
from hbmplan.schedules.router import RouterLoss, count_reuse, resolve_router_loss
from hbmplan.schedules.step_plan import plan_step
from hbmplan.token_filter import TokenFilter

__all__ = ["reuse_step", "run_step"]


def reuse_step(
    model: nn.Module | CausalLMAdapter,
    groups: Sequence[Group],
    loss_fn: LossFn,
    tokens_per_microbatch: int | None = None,
    *,
    config: ReuseConfig | None = None,
    grad_cache_dtype: torch.dtype | None = None,
    check_finite: bool = False,
    router_loss: RouterLossMode = "per-trajectory",
    attention: Attention = "auto",
    deterministic: bool = False,
    participants: Sequence[Participant] = (),
    skip_inert: bool = True,
    check_skips: bool = False,
    token_filter: TokenFilter | None = None,
    temperature: float = 1.0,
    entropy: bool = False,
) -> StepStats:
    """One training step with the reuse schedule; gradients accumulate into ``.grad``.

    Args:
        model: a supported causal LM (see :func:`hbmplan.models.adapt`) or an adapter.
        groups: groups to train; each runs phases A, B and C in turn.
        loss_fn: ``loss_fn(logprobs [S_i], group, i) -> scalar``, summed over responses.
        tokens_per_microbatch, grad_cache_dtype, check_finite, router_loss, attention,
            deterministic, skip_inert, check_skips, token_filter, temperature, entropy: the step's
            options, as documented on :class:`hbmplan.ReuseConfig`.
        config: the options as one :class:`~hbmplan.ReuseConfig` instead of keywords (giving
            both is a ``TypeError``). A config that asks for offload (``hbm_budget`` or
            ``offload="all"``) plans and offloads for this call alone (:func:`hbmplan.memory`
            keeps its host pool and plans across steps).
        participants: more phase-hook participants (see :mod:`hbmplan.runtime.participant`),
            run in order after NVTX and before CPU byte metering.

    This function alone is not atomic: use :func:`hbmplan.memory` for a step that restores
    ``.grad`` on failure. Its own buffers are released on any exit.
    """
    keywords = dict(
        tokens_per_microbatch=tokens_per_microbatch, grad_cache_dtype=grad_cache_dtype,
        check_finite=check_finite, router_loss=router_loss, attention=attention,
        deterministic=deterministic, skip_inert=skip_inert, check_skips=check_skips,
        token_filter=token_filter, temperature=temperature, entropy=entropy,
    )  # fmt: skip
    cfg = config_or_keywords(config, ReuseConfig, keywords, "the step's options")
    adapter = adapt(model)
    _, offload, extra = offload_participants(model_device(adapter), cfg)
    try:
        return run_step(adapter, groups, loss_fn, cfg, [*participants, *extra])
    finally:
        offload.close()


def run_step(
    model: nn.Module | CausalLMAdapter,
    groups: Sequence[Group],
    loss_fn: LossFn,
    config: ReuseConfig,
    participants: Sequence[Participant] = (),
) -> StepStats:
    """The driver: validate, fix the step's structure, run every group's phases with the
    participants' hooks (NVTX first, ``participants`` in order, CPU byte metering last), and
    give every participant the step's outcome. Raises the step's first failure, after every
    participant's ``end_step(ok=False)`` and ``abort``."""
    adapter = adapt(model)
    if config.cp_mesh is not None:
        raise ValueError(
            "a config with cp_mesh runs through hbmplan.memory (or "
            "hbmplan.distributed.context_parallel.cp_step), not reuse_step"
        )
    spec = resolve_router_loss(config.router_loss, adapter.router)
    validate_groups(groups, adapter.vocab_size, adapter.max_positions, model_device(adapter))
    adapter.check_schedulable()
    check_filter(config.token_filter, spec)
    if config.offloads and tensor_parallel_degree(adapter.model) > 1:
        raise ValueError(
            "offload (hbm_budget or offload='all') does not run under tensor parallel yet: the "
            "saved activations are DTensors; give no hbm_budget"
        )
    meter = [ByteMeter()] if groups[0].prompt.device.type != "cuda" else []
    parts = Participants([NvtxRanges(), *participants, *meter])
    plan = parts.adjust_plan(plan_step(adapter, groups, config, loss_fn, spec is not None))
    device = groups[0].prompt.device
    trajectories = sum(len(mb.indices) for g in plan.groups for mb in g.microbatches)
    stats = StepStats("reuse", groups=len(plan.groups), trajectories=trajectories)
    stats.attention, stats.attention_note = plan.attention.name, plan.attention.why
    stats.skipped = plan.skipped
    if config.entropy:
        stats.token_entropy = [[None] * g.group.group_size for g in plan.groups]
    clock = PhaseClock(stats, device)
    router = RouterLoss(spec, config.router_loss) if spec is not None else None
    step = StepContext(
        adapter, plan, config, stats, device, router is not None, prompt_needs_graph(adapter)
    )
    failure = None
    try:
        parts.begin_step(step)
        if router is not None and router.mode == "global-batch":
            with clock.phase("count"):
                counts = count_reuse(adapter, spec, groups, config.tokens_per_microbatch)
                router.set_global(*parts.router_counts(step, *counts))
        total = None
        for index, group in enumerate(plan.groups):
            loss = run_group(step, parts, index, group, loss_fn, router, clock)
            total = loss if total is None else total + loss
        stats.loss = total
        stats.router = router.report() if router is not None else None
        if stats.token_entropy is not None:  # indexed like ``groups`` (skipping drops some)
            ran = {id(g.group): e for g, e in zip(plan.groups, stats.token_entropy, strict=True)}
            stats.token_entropy = [ran.get(id(g), [None] * g.group_size) for g in groups]
    except BaseException as exc:
        failure = exc
    failure = parts.end_step(step, failure)
    if failure is not None:
        parts.abort(failure)
        # The traceback would keep the failed microbatch's graph (and through it the gradient
        # cache) alive for as long as the caller holds the exception.
        traceback.clear_frames(failure.__traceback__)
        raise failure
    return clock.finish()
