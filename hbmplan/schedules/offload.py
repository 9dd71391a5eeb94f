"""Carries out plans in the reuse schedule: dormant prompt activations go to a host pool during
phases A/B and come back, in reverse layer order, just ahead of phase C's backward.

The first step of a new shape captures phase A whole, plans from the measured lifetimes, and
offloads right after phase A (so that step's phase-A peak is the no-offload one). Later steps of
the same shape stream: at each layer boundary of phase A the planned storages of the finished
layer are copied out, and the forward waits for copies more than ``offload_lag`` layers old, so
phase A's peak follows the plan too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from hbmplan.allocator.engine import OffloadEngine, OffloadHandle, OffloadStats
from hbmplan.allocator.pool import HostPool
from hbmplan.planner.capture import SavedStorage, SavedTensorCapture, storage_key
from hbmplan.planner.lifetimes import Lifetime, classify
from hbmplan.planner.plan import Plan, PlanInputs, Rates, make_plan

__all__ = ["OffloadMode", "OffloadReport", "PromptOffloader"]

OffloadMode = Literal["auto", "off", "all"]
_ALIGN_SLACK = 512  # the pool's block alignment: worst-case padding per block


@dataclass(frozen=True)
class OffloadReport:
    """What offload did in one step."""

    plan: Plan | None
    """The plan the step ran (``None``: offload off and no budget)."""
    engine: OffloadStats | None
    """Bytes, copies, link times and exposed wait of the engine (cumulative per context)."""
    streamed: bool
    """Whether phase A streamed its offloads (a cached plan) or offloaded after phase A."""


class PromptOffloader:
    """Plans and executes offload of the prompt's dormant saved tensors for a memory context.

    Args:
        device: the model's device.
        budget: activation bytes the schedule may hold on the device (``None``: no limit).
        mode: "auto" (plan under ``budget``), "all" (offload every dormant storage), "off".
        rates: link and compute rates for the planner (default: DESIGN.md's H200 numbers).

    Owns one :class:`HostPool` (allocated once, grown only when a new shape needs more) and one
    :class:`OffloadEngine`; :meth:`close` releases both.
    """

    def __init__(
        self, device: torch.device, budget: int | None, mode: OffloadMode, rates: Rates | None
    ) -> None:
        self.device, self.budget, self.mode = device, budget, mode
        self.rates = rates or Rates()
        self._plans: dict[tuple, tuple[Plan, dict[int, int | None]]] = {}
        self._pool: HostPool | None = None
        self._engine: OffloadEngine | None = None
        self._handles: list[tuple[int | None, OffloadHandle]] = []
        self._plan: Plan | None = None
        self._streamed = False

    @property
    def active(self) -> bool:
        """Whether this context ever offloads (or must check a budget)."""
        return self.mode == "all" or self.budget is not None

    # -- phase A -------------------------------------------------------------------------------
    def begin_group(self, capture: SavedTensorCapture, shape_key: tuple) -> None:
        """Before phase A: stream offloads if a plan for this shape is known."""
        self._handles, self._plan = [], None
        cached = self._plans.get(shape_key)
        if cached is not None:
            self._plan, last = cached
            self._streamed = self._plan.offload_bytes > 0
            if self._streamed:
                self._ensure_engine(self._plan)
                capture.on_layer_start = self._streamer(capture, self._plan, last)
        else:
            self._streamed = False

    def _streamer(self, capture: SavedTensorCapture, plan: Plan, last: dict[int, int | None]):
        """Layer-boundary hook of phase A: offload planned storages whose last save (known from
        the step that made the plan) is in a finished layer, then hold the forward until copies
        older than ``offload_lag`` layers are out."""

        def finished(rec: SavedStorage, layer: int) -> bool:
            last_layer = last.get(rec.id, layer)
            return last_layer is None or last_layer < layer

        def on_layer_start(layer: int) -> None:
            for rec in capture.records:
                if (
                    plan.decisions.get(rec.id) == "offload"
                    and not (rec.offloaded or rec.freed)
                    and finished(rec, layer)
                ):
                    self._handles.append((last.get(rec.id), capture.offload(rec, self._engine)))
            lag = layer - plan.offload_lag
            self._engine.wait_offloaded(
                h for lay, h in self._handles if lay is not None and lay < lag
            )

        return on_layer_start

    def after_phase_a(
        self,
        capture: SavedTensorCapture,
        prompt_kv: Sequence[torch.Tensor],
        shape_key: tuple,
        grad_cache_bytes: int,
        b_working_bytes: int,
    ) -> list[Lifetime]:
        """Classify the prompt's saved storages; plan (first step of a shape) and offload what
        the plan says and streaming has not yet moved. Raises ``BudgetError`` when no plan fits."""
        capture.on_layer_start = None
        lifetimes = classify(capture.live_records(), prompt_kv)
        plan = self._plan
        if plan is None:
            plan = self._plan = self._make_plan(lifetimes, grad_cache_bytes, b_working_bytes)
            self._plans[shape_key] = (plan, {lt.id: lt.layer for lt in lifetimes})
        elif set(plan.decisions) != {lt.id for lt in lifetimes}:
            # the capture differs from the step that made the plan: run this step on it as it
            # is (unknown storages stay) and replan from the next step's own capture
            del self._plans[shape_key]
        if plan.offload_bytes == 0:
            return lifetimes
        self._ensure_engine(plan)
        for rec in capture.live_records():
            if plan.decisions.get(rec.id) == "offload" and not rec.offloaded:
                self._handles.append((rec.last_layer, capture.offload(rec, self._engine)))
        return lifetimes

    def _make_plan(self, lifetimes: list[Lifetime], grad_cache: int, b_working: int) -> Plan:
        per_layer: dict[int | None, int] = {}
        for lt in lifetimes:
            per_layer[lt.layer] = per_layer.get(lt.layer, 0) + lt.nbytes
        layer_max = max(per_layer.values(), default=0)
        inputs = PlanInputs(
            lifetimes=lifetimes,
            budget=self.budget,
            hot_extra_bytes=grad_cache,
            a_working_bytes=layer_max,
            b_working_bytes=b_working,
            c_working_bytes=layer_max,
            rates=self.rates,
            offload=self.mode != "off",
            recompute=False,  # the schedule executes keep/offload; recompute is planned only
            mode="all" if self.mode == "all" else "auto",
        )
        return make_plan(inputs)

    def _ensure_engine(self, plan: Plan) -> None:
        """A pool that holds the plan's offloads (grown only between groups: no live handle)."""
        blocks = sum(1 for d in plan.decisions.values() if d == "offload")
        need = plan.offload_bytes + blocks * _ALIGN_SLACK
        if self._pool is not None and self._pool.capacity >= need:
            return
        assert not self._handles, "the host pool can only grow between groups"
        self.close()
        self._pool = HostPool(max(need, _ALIGN_SLACK), pin=self.device.type == "cuda")
        self._engine = OffloadEngine(self._pool, self.device)

    # -- phases B and C ------------------------------------------------------------------------
    def poll(self) -> None:
        """Release device memory of completed copies (between phase-B microbatches)."""
        if self._engine is not None:
            self._engine.poll()

    def start_reload(self) -> None:
        """Before phase C: reloads in reverse layer order, ``prefetch_depth`` layers ahead."""
        # storages whose graph branch died after their offload were discarded already
        self._handles = [(lay, h) for lay, h in self._handles if h.state != "discarded"]
        if not self._handles or self._plan is None:
            return
        order = sorted(self._handles, key=lambda lh: -1 if lh[0] is None else lh[0], reverse=True)
        per_layer: dict[int | None, int] = {}
        for layer, _ in order:
            per_layer[layer] = per_layer.get(layer, 0) + 1
        depth = max(per_layer.values()) * max(self._plan.prefetch_depth, 1)
        self._engine.start_reload([h for _, h in order], depth)

    def end_group(self) -> None:
        """After phase C: every offloaded storage must have come back."""
        if self._engine is not None:
            assert self._engine.live_handles == 0, "offloaded storages neither fetched nor freed"
        self._handles = []

    def abort(self) -> None:
        """A failed step: drop every handle and give the host pool back."""
        self._handles = []
        self.close()

    def report(self) -> OffloadReport:
        stats = self._engine.stats() if self._engine is not None else None
        return OffloadReport(plan=self._plan, engine=stats, streamed=self._streamed)

    def close(self) -> None:
        """Release the engine and the host pool (idempotent)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def held_bytes(capture: SavedTensorCapture | None, tensors: Sequence[torch.Tensor]) -> int:
    """Device bytes held by the capture's storages plus those of ``tensors`` not among them."""
    if capture is None:
        return 0
    seen = set(capture.storages)
    extra = 0
    for t in tensors:
        key = storage_key(t)
        if key not in seen:
            seen.add(key)
            extra += t.untyped_storage().nbytes()
    return capture.nbytes + extra
