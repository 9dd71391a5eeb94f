"""The data-parallel driver's place in the reuse step: a participant that starts the engine's
step once the plan is final and lets it act after every backward (see
:mod:`hbmplan.distributed.data_parallel`). The vote, the reduction and the reshard run after
the step, in :class:`hbmplan.MemoryContext`, on success and failure alike."""

from __future__ import annotations

import torch

from hbmplan.distributed.data_parallel import DDPSync, FSDP2Sync, sum_router_counts
from hbmplan.runtime.participant import GroupContext, MicrobatchContext, Participant, StepContext

__all__ = ["DataParallelParticipant", "planned_backwards"]


def planned_backwards(ctx: StepContext) -> int:
    """The step's backwards on this rank: phase-B microbatches with work, and one phase C per
    group when phase A keeps a graph."""
    plan = ctx.plan
    b = sum(1 for g in plan.groups for mb in g.microbatches if mb.indices)
    return b + (len(plan.groups) if ctx.prompt_graph else 0)


class DataParallelParticipant(Participant):
    """Starts ``engine``'s step at ``begin_step`` and calls its ``after_backward`` after each
    phase-B backward and each phase C. :meth:`prepare` sets the step's ``sync`` first."""

    def __init__(self, engine: FSDP2Sync | DDPSync) -> None:
        self.engine = engine
        self.sync = True
        self.counted = False

    def prepare(self, sync: bool) -> None:
        """The next step reduces gradients (``True``) or only accumulates them."""
        self.sync = sync
        self.counted = False

    @property
    def started(self) -> bool:
        """Whether the engine's step has begun (and not yet ended)."""
        return self.engine._active

    def begin_step(self, ctx: StepContext) -> None:
        self.engine.begin(planned_backwards(ctx), self.sync)

    def router_counts(
        self, ctx: StepContext, counts: torch.Tensor, tokens: int
    ) -> tuple[torch.Tensor, int]:
        """Global-batch router counts over every rank's tokens."""
        self.counted = True
        return sum_router_counts(counts, tokens, self.engine.group)

    def after_microbatch(self, ctx: MicrobatchContext) -> None:
        if ctx.microbatch.indices:
            self.engine.after_backward()

    def after_c(self, ctx: GroupContext) -> None:
        if ctx.step.prompt_graph:
            self.engine.after_backward()
