"""The dense baseline under FSDP2 or DDP, driven as the reuse step is
(:mod:`hbmplan.distributed.data_parallel`): each rank trains its own groups, ranks may run
different numbers of microbatches, gradients are reduced once (or per backward with
``grad_sync="every-microbatch"``) after the ranks' vote. Not atomic (as
:func:`hbmplan.schedules.dense_step`): a failure on any rank raises on every rank without
reducing, and this rank's ``.grad`` may hold part of the step."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from hbmplan.config import GradSync, RouterLossMode
from hbmplan.distributed.data_parallel import data_parallel, sum_router_counts, unwrap
from hbmplan.group import Group
from hbmplan.models.adapter import adapt
from hbmplan.runtime.stats import StepStats
from hbmplan.schedules.dense import dense_step as _dense_step
from hbmplan.schedules.microbatch import LossFn, pack_rows

__all__ = ["dense_step"]


def dense_step(
    model: nn.Module,
    groups: Sequence[Group],
    loss_fn: LossFn,
    tokens_per_microbatch: int | None = None,
    *,
    check_finite: bool = False,
    router_loss: RouterLossMode = "per-trajectory",
    grad_sync: GradSync = "phase-c",
    sync: bool = True,
) -> StepStats:
    """:func:`hbmplan.schedules.dense_step` on a ``fully_shard`` or DDP model (a plain model:
    exactly that function). Every rank calls it with its own groups (possibly none) and the
    same ``grad_sync`` and ``sync``; afterwards each holds dense training's gradients on the
    union of all ranks' groups divided by the world size."""
    engine = data_parallel(model, grad_sync)
    module = unwrap(model)
    kw = dict(check_finite=check_finite, router_loss=router_loss)
    if engine is None:
        return _dense_step(module, groups, loss_fn, tokens_per_microbatch, **kw)
    planned = sum(
        len(pack_rows([g.trajectory_len(i) for i in range(g.group_size)], tokens_per_microbatch))
        for g in groups
    )
    engine.begin(planned, sync)
    global_batch = router_loss == "global-batch" and adapt(module).router is not None
    counted = []

    def router_counts(counts, tokens):
        counted.append(True)
        return sum_router_counts(counts, tokens, engine.group)

    try:
        if groups:
            stats = _dense_step(
                module, groups, loss_fn, tokens_per_microbatch,
                after_backward=engine.after_backward, router_counts=router_counts, **kw,
            )  # fmt: skip
        else:
            stats = StepStats("dense")
    except BaseException as exc:
        if global_batch and not counted:  # keep the ranks' collective sequence
            sum_router_counts(None, 0, engine.group)
        engine.end(False, exc)
        raise
    if global_batch and not counted:  # no groups here
        sum_router_counts(None, 0, engine.group)
    engine.end(True, None)
    engine.after_merge(sync)
    stats.data_parallel = engine.stats
    return stats
