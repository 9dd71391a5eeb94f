"""What :func:`hbmplan.frontier` returns: per schedule, the longest prompt that fits, the peak of
each phase there and an estimated step time; and the table that prints it, labelled ESTIMATE."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hbmplan.capacity.calibration import Calibration
from hbmplan.capacity.layer_bytes import Target
from hbmplan.capacity.presets import ModelSpec
from hbmplan.capacity.static import Shards, StaticMemory
from hbmplan.capacity.step_bytes import PhaseBytes, Schedule
from hbmplan.capacity.steptime import Card, StepTime

__all__ = ["FrontierResult", "ScheduleFrontier"]

GiB = 2**30


@dataclass(frozen=True)
class ScheduleFrontier:
    """One schedule's frontier."""

    schedule: Schedule
    """Which schedule."""
    max_prompt_len: int
    """Largest prompt length P whose step fits; 0 when even P = 2 does not."""
    total_tokens: int
    """P + S (prompt plus one response) at ``max_prompt_len``; 0 when nothing fits."""
    capped: bool
    """True when the search stopped at ``max_prompt_len`` of :func:`frontier` (still fitting)."""
    phases: dict[str, PhaseBytes]
    """Predicted activation bytes per phase at ``max(max_prompt_len, 2)``, before ``scale``."""
    peak_bytes: dict[str, int]
    """Predicted device peak per phase: static memory + scaled activation bytes."""
    time: StepTime | None = None
    """ESTIMATED step time at :attr:`FrontierResult.prompt_len`; ``None`` where the schedule
    does not fit that prompt, or no card rate applies (a 32/64-bit model, ``target="cpu"``)."""

    @property
    def limit(self) -> str:
        """The phase whose peak binds at ``max_prompt_len``: "A" (prompt forward), "B"
        (responses), "C" (prompt backward) or "dense"."""
        return max(self.peak_bytes, key=self.peak_bytes.__getitem__)


@dataclass(frozen=True)
class FrontierResult:
    """ESTIMATED capacity frontier (a model of saved tensors, not a measurement)."""

    model: ModelSpec
    """Shapes the estimate used."""
    dtype: torch.dtype
    """Parameter and activation dtype."""
    hbm_bytes: int
    """Device memory given."""
    usable_bytes: int
    """``hbm_bytes x (1 - fragmentation)``: what a step's peak may reach."""
    fragmentation: float
    """Fraction of HBM kept free for allocator fragmentation, CUDA context and workspaces."""
    group_size: int
    """G, responses per prompt."""
    response_len: int
    """S, tokens per response."""
    rows_per_microbatch: int
    """Trajectories (dense) or responses (reuse) per microbatch."""
    optimizer: str
    """Optimizer whose state is counted."""
    shards: Shards
    """Sharding degrees."""
    static: StaticMemory
    """Parameters, gradients and optimizer state per device."""
    schedules: dict[str, ScheduleFrontier]
    """Per schedule name."""
    calibration: Calibration | None = None
    """The fitted scale and its measurement, if calibrated."""
    target: Target = "cuda"
    """Device kernels the byte model assumed."""
    prompt_len: int = 0
    """P at which step times are estimated: the one asked for, else the longest prompt every
    schedule that fits at all can train (0 when none fits)."""
    card: Card | None = None
    """Rates the step times assume."""
    estimate: bool = True
    """Always True: these figures are predictions."""

    def __getitem__(self, schedule: str) -> ScheduleFrontier:
        return self.schedules[schedule]

    def table(self) -> str:
        """A plain-text table labelled as an estimate."""
        s, st, gib = self.model, self.static, lambda b: f"{b / GiB:.2f}"
        lines = [
            "hbmplan capacity frontier - ESTIMATE (byte model of saved tensors, not measured)",
            f"model {s.name}: {s.num_parameters / 1e9:.2f}B parameters, {str(self.dtype)[6:]}, "
            f"optimizer {self.optimizer}, fsdp={self.shards.fsdp} tp={self.shards.tp}",
            f"HBM {gib(self.hbm_bytes)} GiB, usable {gib(self.usable_bytes)} GiB "
            f"({self.fragmentation:.0%} margin); static {gib(st.total)} GiB = params "
            f"{gib(st.parameters)} + grads {gib(st.gradients)} + optimizer {gib(st.optimizer)}",
            f"group G={self.group_size}, response S={self.response_len}, "
            f"{self.rows_per_microbatch} row(s) per microbatch",
        ]
        if self.calibration is not None:
            lines.append(
                f"calibrated: activation bytes x {self.calibration.scale:.4f} "
                f"({self.calibration.source})"
            )
        if st.total >= self.usable_bytes:
            lines.append(
                "static memory alone exceeds usable HBM: shard it (fsdp/tp), drop optimizer "
                "state, or use a larger device"
            )
        lines += self._time_lines()
        w = max(len(name) for name in self.schedules) + 2
        header = (
            f"{'schedule':<{w}}{'max P':>9}{'P+S':>9}  {'limit':<6}{'s/step':>9}{'vs best':>10}"
            "   peak GiB per phase"
        )
        lines += ["", header, "-" * (len(header) + 16)]
        times = [f.time.seconds for f in self.schedules.values() if f.time is not None]
        for f in self.schedules.values():
            peaks = "  ".join(f"{k} {gib(v)}" for k, v in f.peak_bytes.items())
            max_p = f"{f.max_prompt_len:,}" + ("+" if f.capped else "")
            limit = f.limit if f.max_prompt_len else "-"
            if f.time is not None:
                sec, rel = f"{f.time.seconds:,.2f}", f"{f.time.seconds / min(times):.2f}x"
            else:
                sec, rel = "-", "no fit" if self.card is not None and self.prompt_len else "-"
            lines.append(
                f"{f.schedule:<{w}}{max_p:>9}{f.total_tokens:>9,}  {limit:<6}{sec:>9}{rel:>10}"
                f"   {peaks}"
            )
        lines += [
            "",
            "limit: the phase whose peak binds at max P (A prompt forward, B responses, C prompt",
            "backward). s/step: one group on one device at the P above; vs best: over the",
            "fastest schedule that fits it. +recompute: the planner rebuilds prompt layers in C",
            "(the frontier assumes all of them; the time takes the fewest that fit, or with",
            "offload the count that hides copies best).",
        ]
        return "\n".join(lines)

    def _time_lines(self) -> list[str]:
        if self.card is None:
            return [
                "step time: not estimated (no card, or no measured rate for this dtype or target)"
            ]
        if not self.prompt_len:
            return ["step time: not estimated (no schedule fits)"]
        c = self.card
        lo, hi = (x / 1e12 for x in c.flops_range)
        return [
            f"step time - ESTIMATE at P={self.prompt_len:,}: FLOPs at the {c.name}'s measured "
            "dense training rate",
            f"({c.flops / 1e12:.0f} TFLOP/s; {lo:.0f}-{hi:.0f} measured), host copies at "
            f"{c.d2h_gbps:.0f} GB/s through the planner's timeline;",
            "no FSDP/TP communication",
        ]

    def __str__(self) -> str:
        return self.table()
