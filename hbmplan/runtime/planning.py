"""The plan each group runs with: chosen before phase A when possible, checked after it.

A group of a shape seen before reuses its plan (cached by the step's shape key). A group of a
new shape (GRPO prompts and responses change length every step) plans before phase A from the
last capture rescaled to its prompt length (:func:`hbmplan.planner.rescale`), and the
prediction is checked against the group's own capture after phase A (replanning on a miss).
Only a plan made before phase A may recompute, since a replay needs the layer's call kept while
the layer runs. :class:`PromptPlanner` is the participant that makes these choices; the
:class:`~hbmplan.runtime.recompute.Recompute` and :class:`~hbmplan.runtime.offload.Offload`
participants carry out the plan it exposes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from hbmplan.config import OffloadMode
from hbmplan.errors import BudgetError
from hbmplan.planner import (
    Lifetime,
    Plan,
    PlanCache,
    PlanInputs,
    Rates,
    layer_working_bytes,
    make_plan,
    phase_b_working_bytes,
    rescale,
)
from hbmplan.runtime.capture import SavedStorage, SavedTensorCapture, storage_key
from hbmplan.runtime.participant import GroupContext, Participant, StepContext

__all__ = ["MAX_PLANS", "PromptPlanner", "classify"]

MAX_PLANS = 64
"""Plans kept per memory context (shapes not seen for a while are predicted again)."""


def classify(storages: Iterable[SavedStorage], read_in_b: Sequence[torch.Tensor]) -> list[Lifetime]:
    """Lifetimes of phase-A storages; ``read_in_b`` are the tensors phase B reads (K/V leaves)."""
    hot = {storage_key(t) for t in read_in_b}
    return [
        Lifetime(
            id=rec.id,
            nbytes=rec.nbytes,
            layer=rec.last_layer,
            op=rec.op,
            dtype=str(rec.dtype),
            born=rec.phase,
            used=("B", "C") if rec.key in hot else ("C",),
        )
        for rec in storages
    ]


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


class PromptPlanner(Participant):
    """Chooses each group's plan for a memory context (see the module docstring).

    Args:
        budget: activation bytes the schedule may hold on the device (``None``: no limit).
        mode: "auto" (plan under ``budget``), "all" (offload every dormant storage), "off"
            (check the budget only).
        rates: link and compute rates for the planner (default: docs/design.md's H200 numbers).

    What it exposes for the group running now: :attr:`plan` (``None`` until one is chosen),
    :attr:`last` (storage id -> the layer of its last save, from the step that made the plan),
    :attr:`streamed` (the plan was chosen before phase A, so phase A carries it out),
    :attr:`predicted` (it is a prediction not yet checked), :attr:`replay_layers` and
    :attr:`checks_inputs` (how phase A's capture must be set up).
    """

    captures_prompt = True

    def __init__(self, budget: int | None, mode: OffloadMode, rates: Rates | None) -> None:
        self.budget, self.mode = budget, mode
        self.rates = rates or Rates()
        self._plans = PlanCache(maxsize=MAX_PLANS)  # (plan, last) by the step's shape key
        self._template: _Template | None = None
        self._layers_ok: set[int] | None = None  # layers whose first saved tensor is their input
        self.predicts = True
        """Plan new shapes before phase A from the last capture (off for mixture-of-experts
        models, whose expert inputs are as large as routing makes them)."""
        self._start_group()

    def _start_group(self) -> None:
        self.plan: Plan | None = None
        self.last: dict[int, int | None] = {}
        self.replay_layers: set[int] = set()
        self.streamed = self.was_predicted = self.mismatch = False
        self._predicted: dict[int, int] | None = None
        self._unmet: tuple[dict[int, int], BudgetError] | None = None
        """A prediction no plan fitted: its lifetimes' bytes and its error (see ``after_a``)."""

    @property
    def predicted(self) -> bool:
        """The running plan is a prediction not yet checked against the group's capture."""
        return self._predicted is not None

    @property
    def has_template(self) -> bool:
        """A capture is known to predict from."""
        return self._template is not None

    @property
    def checks_inputs(self) -> bool:
        """The next capture must check which layers save their input first (the context's first
        capture does, once: a comparison per layer), which recompute needs."""
        return self._layers_ok is None

    # -- hooks ---------------------------------------------------------------------------------
    def begin_step(self, ctx: StepContext) -> None:
        self.predicts = not ctx.adapter.is_moe

    def before_a(self, ctx: GroupContext) -> None:
        """The plan of this shape, or one predicted from the last capture, if any."""
        self._start_group()
        key = ctx.step.plan.shape_key(ctx.plan)
        cached = self._plans.get(key)
        if cached is None and self._template is not None and self.predicts:
            cached = self._predict(ctx)
        if cached is not None:
            self.plan, self.last = cached
            recompute = {
                self.last.get(i) for i, d in self.plan.decisions.items() if d == "recompute"
            }
            self.replay_layers = recompute - {None}
            self.streamed = self.plan.offload_bytes > 0 or bool(self.replay_layers)

    def after_a(self, ctx: GroupContext) -> None:
        """Learn the group's capture; plan (a new shape without a prediction, or a prediction
        that missed) or keep the plan. Raises ``BudgetError`` when no plan fits."""
        self.learn(ctx.capture, ctx.hot, ctx.grad_cache_bytes, ctx.kv_bytes, ctx.plan.prompt_tokens)
        t = self._template
        per_token = sum(lt.nbytes for lt in t.lifetimes) / t.prompt_tokens
        last = {lt.id: lt.layer for lt in t.lifetimes}
        key = ctx.step.plan.shape_key(ctx.plan)
        plan = self.plan
        if self._predicted is not None and self._predicted != {
            lt.id: lt.nbytes for lt in t.lifetimes
        }:
            plan, self.mismatch = None, True  # replan from the real capture
        if plan is None:
            b_working = self._b_working(ctx, per_token, ctx.kv_bytes)
            try:
                self.plan = self._make_plan(t.lifetimes, t.hot_extra_bytes, b_working)
            except BudgetError as exc:
                raise self._smallest(exc, t.lifetimes) from None
            self.last = last
            self._plans.put(key, (self.plan, last))
        elif set(plan.decisions) != set(last):
            # the capture differs from the step that made the plan: run this step on it as it
            # is (unknown storages stay) and replan from the next step's own capture
            self._plans.pop(key)
        elif self._predicted is not None:
            self._plans.put(key, (plan, last))  # the prediction was exact
        self._predicted = None

    # -- learning and predicting ---------------------------------------------------------------
    def learn(
        self,
        capture: SavedTensorCapture,
        hot: Sequence[torch.Tensor],
        grad_cache_bytes: int,
        kv_bytes: int,
        prompt_tokens: int,
    ) -> None:
        """Keep a capture of a prompt forward of ``prompt_tokens`` tokens as the template the
        next shapes' plans are predicted from. ``hot``: what phase B reads."""
        if capture.check_inputs:
            self._layers_ok = {layer for layer, ok in capture.input_first.items() if ok}
        records = capture.live_records()
        # hot bytes outside the lifetimes: K/V no live record holds (the last layer's, whose
        # saving branch died with the discarded hidden states) and the gradient cache
        outside = capture.held_nbytes(hot) - capture.nbytes
        self._template = _Template(
            prompt_tokens,
            classify(records, hot),
            {r.id: (r.shape, math.prod(r.shape) * r.dtype.itemsize) for r in records},
            grad_cache_bytes + outside,
            kv_bytes,
            capture.replayable(self._layers_ok or (), hot),
        )

    def _predict(self, ctx: GroupContext) -> tuple[Plan, dict[int, int | None]] | None:
        """A plan from the last capture rescaled to this prompt; ``None`` when the prediction
        cannot be planned (the group then plans from its own capture after phase A)."""
        t, tokens = self._template, ctx.plan.prompt_tokens
        lifetimes = rescale(t.lifetimes, t.tensors, t.prompt_tokens, tokens)
        total = sum(lt.nbytes for lt in lifetimes)
        hot_extra = t.hot_extra_bytes * tokens // t.prompt_tokens
        kv = t.kv_bytes * tokens // t.prompt_tokens
        b_working = self._b_working(ctx, total / tokens, kv)
        try:
            plan = self._make_plan(lifetimes, hot_extra, b_working, t.replayable)
        except BudgetError as exc:
            # decided on the group's own capture, which may differ
            self._unmet = ({lt.id: lt.nbytes for lt in lifetimes}, exc)
            return None
        self._predicted = {lt.id: lt.nbytes for lt in lifetimes}
        self.was_predicted = True
        return plan, {lt.id: lt.layer for lt in lifetimes}

    def _smallest(self, exc: BudgetError, lifetimes: list[Lifetime]) -> BudgetError:
        """The error naming the smallest budget a group of this shape succeeds with. A plan made
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

    @staticmethod
    def _b_working(ctx: GroupContext, per_token: float, kv_bytes: int) -> int:
        shapes = [(mb.rows, mb.tokens, mb.logprob_bytes) for mb in ctx.plan.microbatches]
        return phase_b_working_bytes(per_token, shapes, kv_bytes, ctx.step.plan.kv_copies)

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
        layer = layer_working_bytes(lifetimes)
        return make_plan(
            PlanInputs(
                lifetimes=lifetimes,
                budget=self.budget,
                hot_extra_bytes=hot_extra,
                a_working_bytes=layer,
                b_working_bytes=b_working,
                c_working_bytes=layer,
                rates=self.rates,
                offload=self.mode != "off",
                recompute=replayable is not None and self.mode == "auto",
                replayable=replayable,
                mode="all" if self.mode == "all" else "auto",
            )
        )
