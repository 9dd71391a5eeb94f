"""Offload: dormant prompt activations go to a host pool during phases A/B and come back, in
reverse layer order, just ahead of phase C's backward.

With a plan chosen before phase A (:class:`~hbmplan.runtime.planning.PromptPlanner`), phase A
streams: at each layer boundary the planned storages of the finished layers are copied out, and
the forward waits for copies more than ``offload_lag`` layers old, so phase A's peak follows the
plan too. Whatever the plan offloads and streaming has not moved goes after phase A. Before
phase C the reloads are queued in reverse layer order (:func:`reload_order`), ``prefetch_depth``
layers ahead; the backward's unpack of each storage fetches it
(:meth:`hbmplan.runtime.capture.SavedTensorCapture.offload`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hbmplan.allocator.engine import OffloadEngine, OffloadHandle, OffloadStats
from hbmplan.allocator.pool import HostPool
from hbmplan.planner import Plan
from hbmplan.runtime.participant import (
    GroupContext,
    MicrobatchContext,
    Participant,
    StepContext,
)
from hbmplan.runtime.planning import PromptPlanner

__all__ = ["Offload", "OffloadReport", "reload_order"]

_ALIGN_SLACK = 512  # the pool's block alignment: worst-case padding per block


@dataclass(frozen=True)
class OffloadReport:
    """What offload did in one step."""

    plan: Plan | None
    """The plan the step ran (``None``: offload off and no budget)."""
    engine: OffloadStats | None
    """Bytes, copies, link times and exposed wait of the engine (cumulative per context)."""
    streamed: bool
    """Whether phase A streamed its offloads (a cached or predicted plan) or offloaded after A."""
    predicted: bool = False
    """Whether the step planned before phase A from a rescaled earlier capture."""
    mismatch: bool = False
    """The prediction differed from the step's capture: it replanned after phase A (offloading
    only what the host pool, sized for the prediction, could still take)."""


def reload_order(
    handles: Sequence[tuple[int | None, OffloadHandle]], prefetch_depth: int
) -> tuple[list[OffloadHandle], int]:
    """Phase C's reloads: the handles of ``(layer, handle)`` pairs from the last layer to the
    first (storages outside the layers last), and how many to keep in flight:
    ``prefetch_depth`` layers' worth of the layer with the most offloaded storages."""
    order = sorted(handles, key=lambda lh: -1 if lh[0] is None else lh[0], reverse=True)
    per_layer: dict[int | None, int] = {}
    for layer, _ in order:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    return [h for _, h in order], max(per_layer.values()) * max(prefetch_depth, 1)


class Offload(Participant):
    """Carries out the offload decisions of ``planner``'s plan on ``device``.

    Owns one :class:`HostPool` (allocated once, grown only between groups when a new shape needs
    more) and one :class:`OffloadEngine`; :meth:`close` releases both (a failed step does too).
    """

    captures_prompt = True

    def __init__(self, planner: PromptPlanner, device: torch.device) -> None:
        self.planner, self.device = planner, device
        self._pool: HostPool | None = None
        self._engine: OffloadEngine | None = None
        self._handles: list[tuple[int | None, OffloadHandle]] = []

    # -- phase A -------------------------------------------------------------------------------
    def before_a(self, ctx: GroupContext) -> None:
        """A pool for the plan chosen before phase A (1.25 times over for a prediction)."""
        self._handles = []
        plan = self.planner.plan
        if plan is not None and plan.offload_bytes > 0:
            self._ensure_engine(plan, margin=1.25 if self.planner.predicted else 1.0)

    def on_layer(self, ctx: GroupContext, layer: int) -> None:
        """Offload planned storages whose last save is in a finished layer, then hold the
        forward until copies older than ``offload_lag`` layers are out. For a prediction, whose
        pool may be too small for the real sizes, a storage the pool cannot take stays."""
        planner = self.planner
        if not planner.streamed:
            return
        plan, capture = planner.plan, ctx.capture
        for rec in capture.records:
            if plan.decisions.get(rec.id) != "offload":
                continue
            if rec.offloaded or rec.freed or rec.recomputed:
                continue
            last = planner.last.get(rec.id, layer)
            if last is not None and last >= layer:
                continue
            if not planner.predicted or self._pool.fits(rec.nbytes):
                self._handles.append((planner.last.get(rec.id), capture.offload(rec, self._engine)))
        if self._engine is not None:
            lag = layer - plan.offload_lag
            self._engine.wait_offloaded(
                h for lay, h in self._handles if lay is not None and lay < lag
            )

    def after_a(self, ctx: GroupContext) -> None:
        """Offload what the (final) plan says and streaming has not moved. A missed prediction
        may need a larger pool than the one streaming already uses: then what still fits goes,
        and the rest stays on the device this group."""
        plan, capture = self.planner.plan, ctx.capture
        for rec in capture.live_records():
            # planned for recompute, but its layer cannot replay (its first saved tensor is not
            # its input): the host takes it if the pool can, else it stays
            if plan.decisions.get(rec.id) != "recompute" or rec.recomputed:
                continue
            if self._engine is not None and self._pool.fits(rec.nbytes):
                self._handles.append((rec.last_layer, capture.offload(rec, self._engine)))
        if plan.offload_bytes == 0:
            return
        best_effort = bool(self._handles) and not self._fits(plan)
        if not best_effort:
            self._ensure_engine(plan)
        for rec in capture.live_records():
            if plan.decisions.get(rec.id) == "offload" and not (rec.offloaded or rec.recomputed):
                if best_effort and not self._pool.fits(rec.nbytes):
                    continue
                self._handles.append((rec.last_layer, capture.offload(rec, self._engine)))

    # -- phases B and C ------------------------------------------------------------------------
    def after_microbatch(self, ctx: MicrobatchContext) -> None:
        """Release device memory of completed copies."""
        if self._engine is not None:
            self._engine.poll()

    def before_c(self, ctx: GroupContext) -> None:
        """Queue the reloads (:func:`reload_order`)."""
        # storages whose graph branch died after their offload were discarded already
        self._handles = [(lay, h) for lay, h in self._handles if h.state != "discarded"]
        if not self._handles or self.planner.plan is None:
            return
        order, depth = reload_order(self._handles, self.planner.plan.prefetch_depth)
        self._engine.start_reload(order, depth)

    def after_c(self, ctx: GroupContext) -> None:
        """Every offloaded storage must have come back (or been discarded)."""
        if self._engine is not None:
            assert self._engine.live_handles == 0, "offloaded storages neither fetched nor freed"
        self._handles = []

    # -- step ----------------------------------------------------------------------------------
    def end_step(self, ctx: StepContext, ok: bool) -> None:
        if ok:
            ctx.stats.offload = self.report()

    def abort(self, exc: BaseException) -> None:
        """A failed step: drop every handle and give the host pool back."""
        self._handles = []
        self.close()

    def report(self) -> OffloadReport:
        p = self.planner
        return OffloadReport(
            plan=p.plan,
            engine=self._engine.stats() if self._engine is not None else None,
            streamed=p.streamed,
            predicted=p.was_predicted,
            mismatch=p.mismatch,
        )

    def close(self) -> None:
        """Release the engine and the host pool (idempotent)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    # -- the pool ------------------------------------------------------------------------------
    @staticmethod
    def _pool_need(plan: Plan) -> int:
        blocks = sum(1 for d in plan.decisions.values() if d == "offload")
        return plan.offload_bytes + blocks * _ALIGN_SLACK

    def _fits(self, plan: Plan) -> bool:
        return self._pool is not None and self._pool.capacity >= self._pool_need(plan)

    def _ensure_engine(self, plan: Plan, margin: float = 1.0) -> None:
        """A pool that holds the plan's offloads, ``margin`` times over (grown only between
        groups: no live handle)."""
        if self._fits(plan):
            return
        need = int(self._pool_need(plan) * margin)
        assert not self._handles, "the host pool can only grow between groups"
        self.close()
        self._pool = HostPool(max(need, _ALIGN_SLACK), pin=self.device.type == "cuda")
        self._engine = OffloadEngine(self._pool, self.device)
