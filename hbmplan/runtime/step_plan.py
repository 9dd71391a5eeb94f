"""The structure of one reuse step as data, fixed before any phase runs: its groups and, for
each, its phase-B microbatches (which responses, and the shapes they run as).

:func:`hbmplan.schedules.step_plan.plan_step` builds it; the driver iterates over it and hands
it to every participant's ``begin_step``. It is the one place the step's structure lives: a
participant that needs to know what is coming (the offload planner's phase-B working set, a
data-parallel wrapper padding ranks to a common shape) reads it here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hbmplan.group import Group
from hbmplan.models.packed import KernelImpl
from hbmplan.runtime.stats import SkipStats

__all__ = ["GroupPlan", "Microbatch", "PhaseBAttention", "StepPlan"]


@dataclass(frozen=True)
class PhaseBAttention:
    """How phase B attends to the prompt K/V, resolved once per step."""

    impl: KernelImpl | None
    """The kernel implementation for packed rows; ``None`` for padded rows."""
    why: str
    """Why ``"auto"`` chose it (empty when it was asked for)."""

    @property
    def packed(self) -> bool:
        """Rows run end to end through the prefix-attention kernel (or its reference)."""
        return self.impl is not None

    @property
    def name(self) -> str:
        """The path's name: "triton", "reference" or "padded"."""
        return self.impl or "padded"


@dataclass(frozen=True)
class Microbatch:
    """One phase-B forward+backward of a group."""

    indices: tuple[int, ...]
    """The group's responses it trains, in order. Empty: no forward or backward runs, only the
    microbatch hooks (a rank padding its step to the others' shape)."""
    rows: int
    """Rows it runs as: padded rows, or packed sequences."""
    tokens: int
    """Tokens it runs, padding included (padded: rows x longest row; packed: their sum)."""
    logprob_bytes: int
    """Device bytes its log-probs work in (see :func:`hbmplan.kernels.logprobs.logprob_bytes`)."""
    lengths: tuple[int, ...] = ()
    """Tokens of each response it runs, in ``indices`` order: fewer than the response's length
    when the loss declared a masked tail (``loss_extent``; the loss still gets ``[S_i]``
    log-probs, the tail as detached zeros). Empty: every response whole."""

    def length(self, k: int, group: Group) -> int:
        """Tokens the ``k``-th response of this microbatch runs."""
        return self.lengths[k] if self.lengths else group.response_lens[self.indices[k]]


@dataclass(frozen=True)
class GroupPlan:
    """One group of the step and its microbatches."""

    group: Group
    microbatches: tuple[Microbatch, ...]
    declared: tuple[int, ...] = ()
    """Per response of the group, the leading tokens the loss declared to carry weight: 0 for
    an inert response (``loss_fn.inert``), ``S_i`` when nothing was declared (see
    :mod:`hbmplan.schedules.skipping`). Empty: no declarations. With ``check_skips`` phase B
    runs every token and checks these."""

    @property
    def prompt_tokens(self) -> int:
        """P - 1: the tokens phase A runs (the last prompt token starts every response row)."""
        return self.group.prompt_len - 1


@dataclass(frozen=True)
class StepPlan:
    """The step: groups in the order they run, and the phase-B attention they all use."""

    groups: tuple[GroupPlan, ...]
    attention: PhaseBAttention
    skipped: SkipStats = field(default_factory=SkipStats)
    """What exact skipping left out (groups, responses and tokens that are not in ``groups``)."""

    @property
    def kv_copies(self) -> bool:
        """Whether each phase-B row holds its own copy of the prompt K/V (padded rows and the
        kernel's reference concatenate; the Triton kernel reads them in place)."""
        return self.attention.impl != "triton"

    def shape_key(self, group: GroupPlan) -> tuple:
        """What fixes a group's saved-tensor shapes: prompt length, attention path and the
        microbatches' (rows, tokens). Plans are cached by it."""
        shapes = tuple((mb.rows, mb.tokens) for mb in group.microbatches)
        return (group.group.prompt_len, self.attention.name, shapes)
