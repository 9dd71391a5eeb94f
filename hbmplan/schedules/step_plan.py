"""Build a reuse step's :class:`~hbmplan.runtime.step_plan.StepPlan` before any phase runs:
resolve phase B's attention once, and split each group's responses into microbatches."""

from __future__ import annotations

from collections.abc import Sequence

from hbmplan.config import ReuseConfig
from hbmplan.group import Group
from hbmplan.models.adapter import CausalLMAdapter, model_dtype
from hbmplan.runtime.step_plan import GroupPlan, Microbatch, StepPlan
from hbmplan.schedules.attention import resolve_attention
from hbmplan.schedules.microbatch import logprob_working_bytes, pack_rows, pack_tokens

__all__ = ["plan_step"]


def plan_step(adapter: CausalLMAdapter, groups: Sequence[Group], config: ReuseConfig) -> StepPlan:
    """The step's groups and microbatches for validated ``groups``.

    Packed rows (the prefix-attention kernel or its reference) fill a microbatch while the
    responses' total tokens stay within ``config.tokens_per_microbatch``; padded rows while
    rows x longest row does. Raises what :func:`resolve_attention` raises for an attention path
    the model or groups cannot take.
    """
    dtype = model_dtype(adapter)
    attention = resolve_attention(config.attention, adapter, groups, dtype, config.grad_cache_dtype)
    tpm = config.tokens_per_microbatch
    plans = []
    for group in groups:
        lens = group.response_lens
        split = pack_tokens(lens, tpm) if attention.packed else pack_rows(lens, tpm)
        microbatches = []
        for indices in split:
            sizes = [lens[i] for i in indices]
            tokens = sum(sizes) if attention.packed else len(sizes) * max(sizes)
            microbatches.append(
                Microbatch(
                    indices=tuple(indices),
                    rows=len(indices),
                    tokens=tokens,
                    logprob_bytes=logprob_working_bytes(adapter, tokens, dtype),
                )
            )
        plans.append(GroupPlan(group, tuple(microbatches)))
    return StepPlan(tuple(plans), attention)
