"""The phase-hook protocol: everything that acts between the reuse step's phases is a
:class:`Participant`, called by the driver at three levels with small read-only contexts.

Levels and hooks (every default does nothing):

* step: ``adjust_plan`` (may return a revised :class:`StepPlan`: drop responses that carry no
  gradient, pad ranks to a common shape), ``begin_step`` (the plan is final; nothing has run),
  ``router_counts`` (a MoE step's global-batch counts, after its counting pass),
  ``end_step(ok)`` (every
  group has run, or the step failed: ``ok`` is False; always called once per ``begin_step``, so
  a cross-rank vote runs on a failing rank too), ``abort(exc)`` (after ``end_step`` of a failed
  step: release what the participant holds).
* group: ``before_a``, ``on_layer`` (each decoder layer's start in phase A), ``after_a`` (the
  prompt K/V and gradient cache exist), ``before_c``, ``after_c``.
* microbatch: ``before_microbatch``, ``before_backward`` (the loss exists), ``after_microbatch``.

Participants run in the order they are given, at every hook. A participant reads its context
and writes only its own state, the step's :class:`StepStats` and the runtime objects it is
given (the capture it configures, the engine it drives); it never writes another participant's
attributes, and the driver takes no callables from it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from hbmplan.config import ReuseConfig
from hbmplan.group import Group
from hbmplan.models.adapter import CausalLMAdapter
from hbmplan.runtime.capture import SavedTensorCapture
from hbmplan.runtime.stats import StepStats
from hbmplan.runtime.step_plan import GroupPlan, Microbatch, StepPlan

__all__ = [
    "GroupContext",
    "MicrobatchContext",
    "Participant",
    "Participants",
    "Phase",
    "StepContext",
]

Phase = Literal["A", "B", "C"]


@dataclass(frozen=True)
class StepContext:
    """What every hook of one step may read."""

    adapter: CausalLMAdapter
    """The model, through its adapter."""
    plan: StepPlan
    """The step's groups and microbatches."""
    config: ReuseConfig
    """The step's options."""
    stats: StepStats
    """The step's statistics: participants record their own figures in it."""
    device: torch.device
    """The model's device."""
    routed: bool
    """Forwards record router logits (a mixture-of-experts model with its router loss on)."""
    prompt_graph: bool = True
    """Phase A keeps a graph: some parameter outside the LM head trains. Without one (every
    parameter the prompt forward reaches is frozen) phase A saves nothing and C has nothing to
    do."""

    def model_storages(self) -> list[torch.Tensor]:
        """The model's parameters and buffers (a capture excludes them: they outlive a step); a
        DTensor (tensor parallel) as its local shard, the memory it lives in."""
        model = self.adapter.model
        return [_local(t) for t in (*model.parameters(), *model.buffers())]


def _local(t: torch.Tensor) -> torch.Tensor:
    local = getattr(t, "_local_tensor", None)  # a DTensor's shard, without importing DTensor
    return local if local is not None else t


@dataclass(frozen=True)
class GroupContext:
    """What the group hooks may read. After phase A the driver adds what phase A made."""

    step: StepContext
    index: int
    """Position of the group in ``step.plan.groups``."""
    plan: GroupPlan
    """The group and its microbatches."""
    phase: Phase
    """The phase the hook belongs to ("A" for ``before_a``/``on_layer``/``after_a``)."""
    capture: SavedTensorCapture | None = None
    """The prompt's saved tensors (phase A runs under it when a participant asks for it)."""
    hot: tuple[torch.Tensor, ...] = ()
    """From ``after_a``: what phase B reads, hot for the planner: each layer's K and V, and a
    mixture-of-experts prompt's routing sums."""
    kv_bytes: int = 0
    """From ``after_a``: bytes of the prompt K/V, all layers."""
    grad_cache_bytes: int = 0
    """From ``after_a``: bytes of the gK/gV accumulators, all layers."""

    @property
    def group(self) -> Group:
        return self.plan.group

    @property
    def adapter(self) -> CausalLMAdapter:
        return self.step.adapter


@dataclass(frozen=True)
class MicrobatchContext:
    """What the microbatch hooks may read."""

    group: GroupContext
    index: int
    """Position of the microbatch in ``group.plan.microbatches``."""
    microbatch: Microbatch
    """Its responses and shape."""
    targets: tuple[torch.Tensor, ...]
    """Each of its responses' token ids [S_i] (the log-prob targets)."""
    loss: torch.Tensor | None = None
    """From ``before_backward``: the microbatch's loss, about to run backward."""


class Participant:
    """One concern acting at phase boundaries; override the hooks it needs."""

    captures_prompt: bool = False
    """Reads ``GroupContext.capture``: phase A runs under a saved-tensor capture."""

    def adjust_plan(self, plan: StepPlan) -> StepPlan:
        """Before anything runs: the step's plan as this participant needs it (the driver runs
        the plan the last participant returns). An empty microbatch runs its hooks only."""
        return plan

    def begin_step(self, ctx: StepContext) -> None:
        """Before the first group: the step's plan is final."""

    def router_counts(
        self, ctx: StepContext, counts: torch.Tensor, tokens: int
    ) -> tuple[torch.Tensor, int]:
        """A mixture-of-experts step with ``router_loss="global-batch"``, after its counting
        pass: the counts int64 [L, E] and tokens the loss's weights use (a data-parallel
        participant sums them over ranks). Default: as given."""
        return counts, tokens

    def end_step(self, ctx: StepContext, ok: bool) -> None:
        """After the last group (``ok``), or after a failure (not ``ok``); once per step."""

    def abort(self, exc: BaseException) -> None:
        """The step failed with ``exc`` (after ``end_step``): drop what the step left."""

    def before_a(self, ctx: GroupContext) -> None:
        """Before the prompt forward."""

    def on_layer(self, ctx: GroupContext, layer: int) -> None:
        """Phase A is about to run decoder layer ``layer``."""

    def after_a(self, ctx: GroupContext) -> None:
        """After the prompt forward; ``ctx.hot``, ``kv_bytes`` and ``grad_cache_bytes`` are set."""

    def before_microbatch(self, ctx: MicrobatchContext) -> None:
        """Before a phase-B microbatch's forward."""

    def before_backward(self, ctx: MicrobatchContext) -> None:
        """Between a microbatch's loss (``ctx.loss``) and its backward."""

    def after_microbatch(self, ctx: MicrobatchContext) -> None:
        """After a microbatch's backward."""

    def before_c(self, ctx: GroupContext) -> None:
        """Before the prompt backward."""

    def after_c(self, ctx: GroupContext) -> None:
        """After the prompt backward."""


def _overrides(p: Participant, hook: str) -> bool:
    return getattr(type(p), hook) is not getattr(Participant, hook)


class Participants:
    """Calls each hook on every participant, in order (the driver's one handle on them)."""

    def __init__(self, participants: Sequence[Participant]) -> None:
        for p in participants:
            if not isinstance(p, Participant):
                raise TypeError(
                    f"participants must be hbmplan Participant instances, got {type(p).__name__}"
                )
        self._parts = list(participants)

    @property
    def captures_prompt(self) -> bool:
        """Whether a participant reads the prompt's saved-tensor capture."""
        return any(p.captures_prompt for p in self._parts)

    def _each(self, hook: str, *args) -> None:
        for p in self._parts:
            getattr(p, hook)(*args)

    def adjust_plan(self, plan: StepPlan) -> StepPlan:
        """The plan after every participant's ``adjust_plan``, in order."""
        for p in self._parts:
            plan = p.adjust_plan(plan)
            if not isinstance(plan, StepPlan):
                raise TypeError(
                    f"{type(p).__name__}.adjust_plan must return a StepPlan, got "
                    f"{type(plan).__name__}"
                )
        return plan

    def begin_step(self, ctx: StepContext) -> None:
        self._each("begin_step", ctx)

    def router_counts(
        self, ctx: StepContext, counts: torch.Tensor, tokens: int
    ) -> tuple[torch.Tensor, int]:
        """The global-batch counts after every participant's ``router_counts``, in order."""
        for p in self._parts:
            counts, tokens = p.router_counts(ctx, counts, tokens)
        return counts, tokens

    def end_step(self, ctx: StepContext, failure: BaseException | None) -> BaseException | None:
        """Every participant's ``end_step``; one that raises makes ``ok`` False for the rest.
        Returns the step's failure (the first), or ``None``."""
        for p in self._parts:
            try:
                p.end_step(ctx, failure is None)
            except BaseException as exc:
                failure = failure or exc
        return failure

    def abort(self, exc: BaseException) -> None:
        """Every participant's ``abort``; a failure to abort is warned about, not raised (the
        step's own failure is what propagates)."""
        for p in self._parts:
            try:
                p.abort(exc)
            except Exception as err:
                warnings.warn(
                    f"{type(p).__name__}.abort failed: {err!r}", RuntimeWarning, stacklevel=2
                )

    def before_a(self, ctx: GroupContext) -> None:
        self._each("before_a", ctx)

    @contextmanager
    def layer_hooks(self, ctx: GroupContext) -> Iterator[None]:
        """Inside the block, each decoder layer's forward first calls every ``on_layer``."""
        listeners = [p for p in self._parts if _overrides(p, "on_layer")]
        if not listeners:
            yield
            return

        def hook(index: int):
            def pre(_module, _args) -> None:
                for p in listeners:
                    p.on_layer(ctx, index)

            return pre

        handles = [
            layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(ctx.adapter.layers)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def after_a(self, ctx: GroupContext) -> None:
        self._each("after_a", ctx)

    def before_microbatch(self, ctx: MicrobatchContext) -> None:
        self._each("before_microbatch", ctx)

    def before_backward(self, ctx: MicrobatchContext) -> None:
        self._each("before_backward", ctx)

    def after_microbatch(self, ctx: MicrobatchContext) -> None:
        self._each("after_microbatch", ctx)

    def before_c(self, ctx: GroupContext) -> None:
        self._each("before_c", ctx)

    def after_c(self, ctx: GroupContext) -> None:
        self._each("after_c", ctx)
