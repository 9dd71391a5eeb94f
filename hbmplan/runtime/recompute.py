"""Recompute: the layers a plan marks drop their dormant saved tensors right after their
forward in phase A and are replayed in phase C, at the first unpack of one of them
(:meth:`hbmplan.runtime.capture.SavedTensorCapture.drop`; the replay is in
:mod:`hbmplan.runtime.replay`)."""

from __future__ import annotations

from hbmplan.runtime.participant import GroupContext, Participant
from hbmplan.runtime.planning import PromptPlanner

__all__ = ["Recompute"]


class Recompute(Participant):
    """Sets phase A's capture up for the planner's plan (which layers keep their call for a
    replay, whether layers are checked for replayability) and drops what the plan recomputes."""

    captures_prompt = True

    def __init__(self, planner: PromptPlanner) -> None:
        self.planner = planner

    def before_a(self, ctx: GroupContext) -> None:
        ctx.capture.check_inputs = self.planner.checks_inputs
        ctx.capture.replay_layers = set(self.planner.replay_layers)

    def on_layer(self, ctx: GroupContext, layer: int) -> None:
        """Drop the planned storages whose last save (known from the step that made the plan)
        is in a finished layer; a layer that cannot replay keeps them (see ``after_a``)."""
        planner = self.planner
        if not planner.streamed:
            return
        for rec in ctx.capture.records:
            if planner.plan.decisions.get(rec.id) != "recompute":
                continue
            if rec.offloaded or rec.freed or rec.recomputed:
                continue
            last = planner.last.get(rec.id, layer)
            if last is None or last < layer:
                ctx.capture.drop(rec)

    def after_a(self, ctx: GroupContext) -> None:
        """The last layer's planned storages (no later layer start drops them). What still
        cannot be dropped is left to :class:`~hbmplan.runtime.offload.Offload`."""
        plan = self.planner.plan
        if plan is None:
            return
        for rec in ctx.capture.live_records():
            if plan.decisions.get(rec.id) == "recompute" and not rec.recomputed:
                ctx.capture.drop(rec)
