"""Carries out plans in the reuse schedule: dormant prompt activations go to a host pool during
phases A/B and come back, in reverse layer order, just ahead of phase C's backward.

Every step streams: at each layer boundary of phase A the planned storages of the finished layer
are copied out, and the forward waits for copies more than ``offload_lag`` layers old, so phase
A's peak follows the plan too. A step of a shape seen before reuses its plan; a step of a new
shape (GRPO prompts and responses change length every step) plans before phase A from the last
capture rescaled to its prompt length (:func:`hbmplan.planner.lifetimes.rescale`), and checks
the prediction against its own capture after phase A (replanning on a miss). Plans made before
phase A may recompute: the planned layers' saved tensors are dropped after their forward and
rebuilt by replaying the layer in phase C (:meth:`SavedTensorCapture.drop`). Before the first
long prompt of a context there is no capture yet: the schedule runs a short probe forward of
:data:`PROBE_TOKENS` prompt tokens (:meth:`PromptOffloader.wants_probe`, :meth:`learn`), whose
capture is rescaled like any other.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from hbmplan.allocator.engine import OffloadEngine, OffloadHandle, OffloadStats
from hbmplan.allocator.pool import HostPool
from hbmplan.errors import BudgetError
from hbmplan.planner.capture import SavedStorage, SavedTensorCapture, storage_key
from hbmplan.planner.lifetimes import Lifetime, classify, rescale
from hbmplan.planner.plan import Plan, PlanInputs, Rates, make_plan

__all__ = ["OffloadMode", "OffloadReport", "PromptOffloader", "held_bytes", "unrecorded_bytes"]

OffloadMode = Literal["auto", "off", "all"]

PROBE_TOKENS = 127
"""Prompt tokens of the probe forward: short, and (odd, prime) unlikely to equal a model dim,
which the rescaling would take for the sequence dim."""
_ALIGN_SLACK = 512  # the pool's block alignment: worst-case padding per block
_MAX_PLANS = 64  # plans kept per context (shapes not seen for a while are predicted again)


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


@dataclass(frozen=True)
class _Template:
    """The last capture, for predicting the next shape's lifetimes."""

    prompt_tokens: int
    lifetimes: list[Lifetime]
    tensors: dict[int, tuple[tuple[int, ...], int]]
    """Per storage id: shape and bytes of its first saved tensor."""
    hot_extra_bytes: int
    """Hot device bytes outside the lifetimes: the gradient cache, K/V no live record holds."""
    kv_bytes: int
    replayable: dict[int, frozenset[int]]
    """Per replayable layer, the storage ids its replay rebuilds (``PlanInputs.replayable``)."""


class PromptOffloader:
    """Plans and executes offload of the prompt's dormant saved tensors for a memory context.

    Args:
        device: the model's device.
        budget: activation bytes the schedule may hold on the device (``None``: no limit).
        mode: "auto" (plan under ``budget``), "all" (offload every dormant storage), "off".
        rates: link and compute rates for the planner (default: docs/design.md's H200 numbers).

    Owns one :class:`HostPool` (allocated once, grown only when a new shape needs more) and one
    :class:`OffloadEngine`; :meth:`close` releases both.
    """

    def __init__(
        self, device: torch.device, budget: int | None, mode: OffloadMode, rates: Rates | None
    ) -> None:
        self.device, self.budget, self.mode = device, budget, mode
        self.rates = rates or Rates()
        # plans by shape, least recently used first (GRPO shapes rarely repeat: kept bounded)
        self._plans: OrderedDict[tuple, tuple[Plan, dict[int, int | None]]] = OrderedDict()
        self._pool: HostPool | None = None
        self._engine: OffloadEngine | None = None
        self._handles: list[tuple[int | None, OffloadHandle]] = []
        self._plan: Plan | None = None
        self._streamed = False
        self._template: _Template | None = None
        self._layers_ok: set[int] | None = None  # layers whose first saved tensor is their input
        self.predict = True
        """Plan new shapes before phase A from the last capture (off for mixture-of-experts
        models, whose expert inputs are as large as routing makes them)."""
        self._predicted: dict[int, int] | None = None
        self._was_predicted = self._mismatch = False
        self._unmet: tuple[dict[int, int], BudgetError] | None = None
        """A prediction no plan fitted: its lifetimes' bytes and its error (see
        :meth:`after_phase_a`)."""

    @property
    def active(self) -> bool:
        """Whether this context ever offloads (or must check a budget)."""
        return self.mode == "all" or self.budget is not None

    # -- phase A -------------------------------------------------------------------------------
    def wants_probe(self, prompt_tokens: int) -> bool:
        """Whether the schedule should run a probe forward before a prompt of ``prompt_tokens``
        (P - 1): offload is on, no capture is known yet, and the prompt is long enough that
        streaming its first step matters (over twice :data:`PROBE_TOKENS`)."""
        return (
            self.mode != "off"
            and self.active
            and self.predict
            and self._template is None
            and prompt_tokens > 2 * PROBE_TOKENS
        )

    def prepare(self, capture: SavedTensorCapture) -> None:
        """Before a prompt forward is captured: the context's first capture checks which layers
        save their input first (once: a comparison per layer), which recompute needs."""
        capture.check_inputs = self._layers_ok is None

    def learn(
        self,
        capture: SavedTensorCapture,
        prompt_kv: Sequence[torch.Tensor],
        grad_cache_bytes: int,
        kv_bytes: int,
        prompt_tokens: int,
    ) -> None:
        """Keep a capture of a prompt forward of ``prompt_tokens`` tokens (the probe) as the
        template the next steps' plans are predicted from."""
        if capture.check_inputs:
            self._layers_ok = {layer for layer, ok in capture.input_first.items() if ok}
        records = capture.live_records()
        # hot bytes outside the lifetimes: K/V no live record holds (the last layer's, whose
        # saving branch died with the discarded hidden states) and the gradient cache
        outside = held_bytes(capture, prompt_kv) - capture.nbytes
        self._template = _Template(
            prompt_tokens,
            classify(records, prompt_kv),
            {r.id: (r.shape, math.prod(r.shape) * r.dtype.itemsize) for r in records},
            grad_cache_bytes + outside,
            kv_bytes,
            capture.replayable(self._layers_ok or (), prompt_kv),
        )

    def begin_group(
        self,
        capture: SavedTensorCapture,
        shape_key: tuple,
        prompt_tokens: int,
        b_working: Callable[[float, int], int],
    ) -> None:
        """Before phase A: stream offloads with the plan of this shape, or with one made now from
        the last capture rescaled to ``prompt_tokens`` (P - 1). ``b_working(saved bytes per
        prompt token, prompt K/V bytes)`` is phase B's working set for the planner."""
        self._handles, self._plan, self._predicted, self._unmet = [], None, None, None
        self._streamed = self._was_predicted = self._mismatch = False
        self.prepare(capture)
        cached = self._plans.get(shape_key)
        if cached is not None:
            self._plans.move_to_end(shape_key)
        if cached is None and self._template is not None and self.predict:
            cached = self._predict(prompt_tokens, b_working)
        if cached is not None:
            self._plan, last = cached
            recompute = {last.get(i) for i, d in self._plan.decisions.items() if d == "recompute"}
            capture.replay_layers = recompute - {None}
            self._streamed = self._plan.offload_bytes > 0 or bool(capture.replay_layers)
            if self._plan.offload_bytes > 0:
                self._ensure_engine(self._plan, margin=1.25 if self._predicted else 1.0)
            if self._streamed:
                capture.on_layer_start = self._streamer(
                    capture, self._plan, last, best_effort=self._predicted is not None
                )

    def _predict(
        self, prompt_tokens: int, b_working: Callable[[float, int], int]
    ) -> tuple[Plan, dict[int, int | None]] | None:
        """A plan from the last capture rescaled to ``prompt_tokens``; ``None`` when the
        prediction cannot be planned (the step then plans from its own capture after phase A)."""
        t = self._template
        lifetimes = rescale(t.lifetimes, t.tensors, t.prompt_tokens, prompt_tokens)
        total = sum(lt.nbytes for lt in lifetimes)
        hot_extra = t.hot_extra_bytes * prompt_tokens // t.prompt_tokens
        kv = t.kv_bytes * prompt_tokens // t.prompt_tokens
        try:
            plan = self._make_plan(
                lifetimes, hot_extra, b_working(total / prompt_tokens, kv), t.replayable
            )
        except BudgetError as exc:
            # decided on the step's own capture, which may differ
            self._unmet = ({lt.id: lt.nbytes for lt in lifetimes}, exc)
            return None
        self._predicted = {lt.id: lt.nbytes for lt in lifetimes}
        self._was_predicted = True
        return plan, {lt.id: lt.layer for lt in lifetimes}

    def _streamer(
        self,
        capture: SavedTensorCapture,
        plan: Plan,
        last: dict[int, int | None],
        best_effort: bool = False,
    ):
        """Layer-boundary hook of phase A: offload (or drop, for recompute) planned storages
        whose last save (known from the step that made the plan) is in a finished layer, then
        hold the forward until copies older than ``offload_lag`` layers are out. ``best_effort``
        (a predicted plan, whose pool may be too small for the real sizes): a storage the pool
        cannot take stays on the device."""

        def finished(rec: SavedStorage, layer: int) -> bool:
            last_layer = last.get(rec.id, layer)
            return last_layer is None or last_layer < layer

        def on_layer_start(layer: int) -> None:
            for rec in capture.records:
                decision = plan.decisions.get(rec.id)
                if rec.offloaded or rec.freed or rec.recomputed or not finished(rec, layer):
                    continue
                if decision == "recompute":
                    capture.drop(rec)  # a layer that cannot replay: handled after phase A
                elif decision == "offload" and (not best_effort or self._pool.fits(rec.nbytes)):
                    self._handles.append((last.get(rec.id), capture.offload(rec, self._engine)))
            if self._engine is None:
                return
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
        kv_bytes: int,
        prompt_tokens: int,
        b_working: Callable[[float, int], int],
    ) -> list[Lifetime]:
        """Classify the prompt's saved storages; plan (a new shape without a prediction, or a
        prediction that missed) and offload what the plan says and streaming has not yet moved.
        ``kv_bytes``: the prompt K/V (all layers); ``b_working`` as for :meth:`begin_group`.
        Raises ``BudgetError`` when no plan fits."""
        capture.on_layer_start = None
        self.learn(capture, prompt_kv, grad_cache_bytes, kv_bytes, prompt_tokens)
        lifetimes = self._template.lifetimes
        hot_extra = self._template.hot_extra_bytes
        total = sum(lt.nbytes for lt in lifetimes)
        b_working_bytes = b_working(total / prompt_tokens, kv_bytes)
        last = {lt.id: lt.layer for lt in lifetimes}
        plan = self._plan
        if self._predicted is not None and self._predicted != {
            lt.id: lt.nbytes for lt in lifetimes
        }:
            plan, self._mismatch = None, True  # replan from the real capture
        if plan is None:
            try:
                plan = self._plan = self._make_plan(lifetimes, hot_extra, b_working_bytes)
            except BudgetError as exc:
                raise self._smallest(exc, lifetimes) from None
            self._remember(shape_key, plan, last)
        elif set(plan.decisions) != set(last):
            # the capture differs from the step that made the plan: run this step on it as it
            # is (unknown storages stay) and replan from the next step's own capture
            self._plans.pop(shape_key, None)
        elif self._predicted is not None:
            self._remember(shape_key, plan, last)  # the prediction was exact
        self._predicted = None
        for rec in capture.live_records():  # recompute planned before phase A (last layer)
            if plan.decisions.get(rec.id) != "recompute" or rec.recomputed or capture.drop(rec):
                continue
            # its layer cannot replay (its first saved tensor is not its input): the host takes
            # it if the pool can, else it stays
            if self._engine is not None and self._pool.fits(rec.nbytes):
                self._handles.append((rec.last_layer, capture.offload(rec, self._engine)))
        if plan.offload_bytes == 0:
            return lifetimes
        # a missed prediction may need a larger pool than the one streaming already uses: then
        # offload what still fits, and the rest stays on the device this step
        best_effort = bool(self._handles) and not self._fits(plan)
        if not best_effort:
            self._ensure_engine(plan)
        for rec in capture.live_records():
            if plan.decisions.get(rec.id) == "offload" and not (rec.offloaded or rec.recomputed):
                if best_effort and not self._pool.fits(rec.nbytes):
                    continue
                self._handles.append((rec.last_layer, capture.offload(rec, self._engine)))
        return lifetimes

    def _smallest(self, exc: BudgetError, lifetimes: list[Lifetime]) -> BudgetError:
        """The error naming the smallest budget a step of this shape succeeds with. A plan made
        after phase A cannot recompute (the layers' calls were not kept), so its minimum can
        exceed the one of the plan made before phase A, which a larger budget would have run:
        when the prediction matched this capture (its plan would have been kept), that smaller
        minimum is the real one."""
        if self._unmet is None:
            return exc
        sizes, predicted = self._unmet
        if sizes != {lt.id: lt.nbytes for lt in lifetimes}:
            return exc  # a prediction that fitted would have been replanned like this one
        return min(exc, predicted, key=lambda e: e.min_feasible)

    def _make_plan(
        self,
        lifetimes: list[Lifetime],
        hot_extra: int,
        b_working: int,
        replayable: dict[int, frozenset[int]] | None = None,
    ) -> Plan:
        """A plan for these lifetimes. ``replayable`` (``PlanInputs.replayable``): the layers
        that may be replayed in phase C instead of keeping their tensors, which needs the plan
        before phase A (the capture keeps those layers' calls); ``None``: keep or offload."""
        per_layer: dict[int | None, int] = {}
        for lt in lifetimes:
            per_layer[lt.layer] = per_layer.get(lt.layer, 0) + lt.nbytes
        layer_max = max(per_layer.values(), default=0)
        inputs = PlanInputs(
            lifetimes=lifetimes,
            budget=self.budget,
            hot_extra_bytes=hot_extra,
            a_working_bytes=layer_max,
            b_working_bytes=b_working,
            c_working_bytes=layer_max,
            rates=self.rates,
            offload=self.mode != "off",
            recompute=replayable is not None and self.mode == "auto",
            replayable=replayable,
            mode="all" if self.mode == "all" else "auto",
        )
        return make_plan(inputs)

    def _remember(self, shape_key: tuple, plan: Plan, last: dict[int, int | None]) -> None:
        self._plans[shape_key] = (plan, last)
        self._plans.move_to_end(shape_key)
        while len(self._plans) > _MAX_PLANS:
            self._plans.popitem(last=False)

    @staticmethod
    def _pool_need(plan: Plan) -> int:
        blocks = sum(1 for d in plan.decisions.values() if d == "offload")
        return plan.offload_bytes + blocks * _ALIGN_SLACK

    def _fits(self, plan: Plan) -> bool:
        return self._pool is not None and self._pool.capacity >= self._pool_need(plan)

    def _ensure_engine(self, plan: Plan, margin: float = 1.0) -> None:
        """A pool that holds the plan's offloads, ``margin`` times over for a predicted plan
        (grown only between groups: no live handle)."""
        if self._fits(plan):
            return
        need = int(self._pool_need(plan) * margin)
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
        return OffloadReport(
            plan=self._plan,
            engine=stats,
            streamed=self._streamed,
            predicted=self._was_predicted,
            mismatch=self._mismatch,
        )

    def close(self) -> None:
        """Release the engine and the host pool (idempotent)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def unrecorded_bytes(capture: SavedTensorCapture, tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the storages of ``tensors`` that the capture never recorded (counted once each):
    what a phase holds beside its saved tensors. A storage the capture recorded and has since
    dropped (the last layer's K/V, saved by its attention until the discarded hidden states'
    branch died) was in the capture's peak already."""
    recorded = {rec.key for rec in capture.records}
    extra = {}
    for t in tensors:
        key = storage_key(t)
        if key not in recorded:
            extra[key] = t.untyped_storage().nbytes()
    return sum(extra.values())


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
