"""Per-step measurements: wall time and peak memory by phase, K/V and gradient-cache bytes.

On CUDA a phase's time comes from CUDA events (read once, at the end of the step) and its peak
from the caching allocator's statistics. On CPU the time is ``perf_counter`` and the peak is the
bytes of live tensors the schedule holds at the end of the phase (saved activations, prompt K/V,
gradient cache), as counted by :class:`hbmplan.runtime.capture.SavedTensorCapture`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = ["PhaseClock", "PhaseStats", "RouterStepStats", "SkipStats", "StepStats"]


@dataclass
class PhaseStats:
    """One phase of one step, summed over the step's groups (peak: the maximum)."""

    seconds: float = 0.0
    """Wall time."""
    peak_bytes: int = 0
    """CUDA: peak allocated bytes during the phase. CPU: bytes the schedule held."""


@dataclass
class RouterStepStats:
    """The router loss of one step of a MoE model, as the dense trainer sees it (all detached)."""

    mode: Literal["per-trajectory", "global-batch"]
    """How the loss was computed (see :mod:`hbmplan.schedules.router`)."""
    loss: torch.Tensor
    """What the router loss added to the back-propagated loss: ``aux_coef * aux + z_coef * z``
    summed over trajectories (per-trajectory) or once for the step (global-batch)."""
    aux_loss: torch.Tensor
    """The load-balancing loss without its coefficient (summed over trajectories)."""
    z_loss: torch.Tensor | None
    """The router z-loss without its coefficient; ``None`` when no z-loss is trained."""
    expert_tokens: torch.Tensor
    """int64 [L, E]: (token, slot) pairs routed to each expert of each router layer, as the dense
    trainer counts them: every trajectory's prompt and response tokens (prompt counts x G)."""


@dataclass(frozen=True)
class SkipStats:
    """What exact skipping left out of a step (see :mod:`hbmplan.schedules.skipping`)."""

    responses: int = 0
    """Inert responses not run (those of skipped groups included)."""
    groups: int = 0
    """Groups whose responses were all inert: no phase A, B or C."""
    tokens: int = 0
    """Response tokens not run: inert responses' and masked tails'."""
    shapes: tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...] = ()
    """Per group that skipped anything: (P, response lengths, tokens run per response, 0 for an
    inert one); what FLOP counts of the savings need."""
    flops_saved: int | None = None
    """Training FLOPs not run (docs/design.md's convention); filled by :func:`hbmplan.memory`
    steps, ``None`` elsewhere."""


@dataclass
class StepStats:
    """What one ``step`` did."""

    schedule: Literal["dense", "reuse"]
    """Which schedule ran."""
    phases: dict[str, PhaseStats] = field(default_factory=dict)
    """Per phase: "A", "B", "C" for reuse; "dense" for the baseline."""
    memory_source: Literal["cuda-allocator", "held-tensors"] = "held-tensors"
    """Where ``peak_bytes`` came from."""
    groups: int = 0
    """Groups in the step."""
    trajectories: int = 0
    """Responses trained."""
    microbatches: int = 0
    """Backward passes over response microbatches."""
    prompt_kv_bytes: int = 0
    """Largest prompt K/V of a group (all layers, K and V)."""
    grad_cache_bytes: int = 0
    """Largest gradient cache (gK/gV) of a group."""
    attention: str = ""
    """Phase B's attention: "triton", "reference" (packed rows) or "padded"; "" for dense."""
    attention_note: str = ""
    """Why ``attention="auto"`` did not take the Triton kernel ("" when it did or was not asked)."""
    loss: torch.Tensor | None = None
    """Sum of the back-propagated loss over all trajectories, detached (no host sync is made to
    read it): the user's loss plus, for a MoE model, the router loss in ``router``."""
    router: RouterStepStats | None = None
    """The router loss and per-expert token counts (MoE models with a router loss on)."""
    offload: Any = None
    """:class:`hbmplan.runtime.offload.OffloadReport` when the step planned offload."""
    data_parallel: Any = None
    """:class:`hbmplan.distributed.data_parallel.DataParallelStats` under FSDP2 or DDP."""
    skipped: SkipStats = field(default_factory=SkipStats)
    """What exact skipping left out: inert responses and groups, masked tails."""
    filtered_tokens: int = 0
    """Response tokens whose backward ``token_filter`` dropped (approximate; 0 when off)."""
    token_entropy: list[list[torch.Tensor | None]] | None = None
    """With ``ReuseConfig(entropy=True)``: per group of the step (in the order given), per
    response, the entropy [n] of each trained token's temperature-scaled next-token
    distribution (detached, the log-probs' dtype; ``None`` for a response exact skipping left
    out); ``None`` otherwise."""

    def record_peak(self, phase: str, nbytes: int) -> None:
        """Raise phase ``phase``'s peak to ``nbytes`` if it is higher (held-tensor metering)."""
        stats = self.phases.setdefault(phase, PhaseStats())
        stats.peak_bytes = max(stats.peak_bytes, int(nbytes))

    @property
    def seconds(self) -> float:
        """Total wall time of the step."""
        return sum(p.seconds for p in self.phases.values())

    @property
    def peak_bytes(self) -> int:
        """Largest phase peak."""
        return max((p.peak_bytes for p in self.phases.values()), default=0)


class PhaseClock:
    """Times phases and records their peaks without a host sync per phase.

    ``with clock.phase("B"):`` times the block; ``clock.sample("B", nbytes)`` reports bytes the
    schedule holds at a point inside it (used on CPU, ignored on CUDA where the allocator's peak
    is exact). ``finish()`` resolves CUDA events into seconds (one sync).
    """

    def __init__(self, stats: StepStats, device: torch.device) -> None:
        self.stats = stats
        self.cuda = device.type == "cuda"
        self.stats.memory_source = "cuda-allocator" if self.cuda else "held-tensors"
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def phase(self, name: str):
        stats = self.stats.phases.setdefault(name, PhaseStats())
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            start, end = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
            stats.peak_bytes = max(stats.peak_bytes, torch.cuda.max_memory_allocated())
        else:
            t0 = time.perf_counter()
            yield
            stats.seconds += time.perf_counter() - t0

    def sample(self, name: str, held_bytes: int) -> None:
        """Record that the schedule holds ``held_bytes`` during phase ``name`` (CPU)."""
        if not self.cuda:
            self.stats.record_peak(name, held_bytes)

    def finish(self) -> StepStats:
        for name, start, end in self._events:
            end.synchronize()
            self.stats.phases[name].seconds += start.elapsed_time(end) / 1000.0
        self._events.clear()
        return self.stats
