"""Build a reuse step's :class:`~hbmplan.runtime.step_plan.StepPlan` before any phase runs:
resolve phase B's attention once, and split each group's responses into microbatches."""

from __future__ import annotations

from collections.abc import Sequence

from hbmplan.config import ReuseConfig
from hbmplan.group import Group
from hbmplan.models.adapter import CausalLMAdapter, model_dtype
from hbmplan.runtime.stats import SkipStats
from hbmplan.runtime.step_plan import GroupPlan, Microbatch, StepPlan
from hbmplan.schedules.attention import resolve_attention
from hbmplan.schedules.microbatch import logprob_working_bytes, pack_rows, pack_tokens
from hbmplan.schedules.skipping import declared_extents, skip_stats

__all__ = ["plan_step"]


def plan_step(
    adapter: CausalLMAdapter,
    groups: Sequence[Group],
    config: ReuseConfig,
    loss_fn: object = None,
    routed: bool = False,
) -> StepPlan:
    """The step's groups and microbatches for validated ``groups``.

    Packed rows (the prefix-attention kernel or its reference) fill a microbatch while the
    responses' total tokens stay within ``config.tokens_per_microbatch``; padded rows while
    rows x longest row does. Raises what :func:`resolve_attention` raises for an attention path
    the model or groups cannot take.

    With ``config.skip_inert`` and a ``loss_fn`` that declares inert responses or loss extents
    (:mod:`hbmplan.schedules.skipping`), and no router loss (``routed``), the plan leaves them
    out: inert responses are in no microbatch, all-inert groups in no group plan, and
    microbatches run each response up to its extent. Skipping happens here, before any
    participant's ``adjust_plan`` (a data-parallel wrapper pads the plan it is given), so ranks
    agree on the skipped plan's shape, never on a step that changes while it runs.
    """
    dtype = model_dtype(adapter)
    attention = resolve_attention(config.attention, adapter, groups, dtype, config.grad_cache_dtype)
    tpm = config.tokens_per_microbatch
    extents = None
    if loss_fn is not None and not routed and (config.skip_inert or config.check_skips):
        extents = declared_extents(loss_fn, groups)
    skipping = extents is not None and config.skip_inert and not config.check_skips
    plans = []
    for g, group in enumerate(groups):
        full = group.response_lens
        run = extents[g] if skipping else full
        order = [i for i in range(group.group_size) if run[i] > 0]
        if not order:
            continue  # every response inert: no phase A, B or C
        lens = [run[i] for i in order]
        split = pack_tokens(lens, tpm) if attention.packed else pack_rows(lens, tpm)
        microbatches = []
        for positions in split:
            indices = tuple(order[j] for j in positions)
            sizes = [lens[j] for j in positions]
            tokens = sum(sizes) if attention.packed else len(sizes) * max(sizes)
            truncated = any(run[i] != full[i] for i in indices)
            microbatches.append(
                Microbatch(
                    indices=indices,
                    rows=len(indices),
                    tokens=tokens,
                    logprob_bytes=logprob_working_bytes(adapter, tokens, dtype),
                    lengths=tuple(sizes) if truncated else (),
                )
            )
        declared = tuple(extents[g]) if extents is not None else ()
        plans.append(GroupPlan(group, tuple(microbatches), declared))
    skipped = skip_stats(groups, extents) if skipping else SkipStats()
    return StepPlan(tuple(plans), attention, skipped)
