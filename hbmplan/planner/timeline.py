"""Timeline model of the reuse schedule (phases A, B, C) that the planner scores plans with.

It predicts, for per-stage byte counts (kept, offloaded, recomputed), the peak device bytes of
each phase and the time the copies and recomputation add to the step (the *exposed* seconds).

Stages. A stage is a maximal run of lifetimes, in capture order, saved by the same decoder layer
(normally one per layer; saves outside the layers form their own stages). Phase A runs the stages
forward in order, phase C backward in reverse order.

Copies. Offloads (D2H) run on one copy stream in stage order during A and B; stage ``k``'s copy
may start when its forward ends, and the forward of stage ``k`` may start only when the copies of
stages ``<= k - 1 - lag`` are complete (B: ``<= n - 1 - lag``): the engine throttles the forward
so at most ``lag + 1`` stages of offloads are in flight. Phase C starts when every offload is
complete (so the link never runs both ways at once). Reloads (H2D) run in reverse stage order;
stage ``j``'s reload may start once the backward of stage ``j + depth + 1`` is done (a window of
``depth`` stages ahead), and stage ``j``'s backward waits for its reload. While any copy runs,
compute runs ``copy_slowdown`` times slower (measured for D2H, assumed for H2D). A recomputed
stage runs its forward again right before its backward.

Exposed seconds = (makespan of A+B) - (A+B compute) + (makespan of C) - (C backward compute);
recompute time is exposed in full.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

__all__ = [
    "Layout",
    "Prediction",
    "Rates",
    "Stage",
    "StageModel",
    "build_stages",
    "exposure_ab",
    "exposure_c",
    "peaks",
    "simulate",
]

_GB = 1e9


@dataclass(frozen=True)
class Rates:
    """Link and compute rates the timeline uses. Defaults: one H200 (docs/design.md measurements).

    Unknown compute times are estimated from the saved bytes: ``forward_s`` = saved bytes /
    ``saved_bytes_per_s``; ``backward_s`` = 2 x forward; ``responses_s`` = 3 x forward (one
    forward+backward over as many response tokens as prompt tokens). Replace them with measured
    timings (:meth:`from_step`) as soon as one step has run.
    """

    d2h_gbps: float = 55.3
    """Device-to-host copy rate, GB/s (1e9 bytes), pinned host memory."""
    h2d_gbps: float = 55.5
    """Host-to-device copy rate, GB/s, pinned host memory."""
    bidir_gbps: float = 98.2
    """Both directions at once, GB/s in total. Recorded for the engine and report; the timeline
    never overlaps the directions (phase C starts after the last offload completes)."""
    copy_slowdown: float = 1.113
    """Factor by which compute slows while a copy runs (GEMM under D2H on the H200)."""
    forward_s: float | None = None
    """Phase A: the prompt forward, seconds. ``None``: ``sum(layer_forward_s)`` if given, else
    estimated from bytes."""
    responses_s: float | None = None
    """Phase B: all response microbatches (forward + backward), seconds. ``None``: 3 x phase A."""
    backward_s: float | None = None
    """Phase C: the prompt backward, seconds. ``None``: ``sum(layer_backward_s)`` if given, else
    2 x phase A."""
    layer_forward_s: tuple[float, ...] | None = None
    """Forward seconds of each decoder layer, indexed by layer. ``None``: phase A's time is split
    across stages in proportion to their saved bytes. Stages outside the layers share what is
    left of ``forward_s``."""
    layer_backward_s: tuple[float, ...] | None = None
    """Backward seconds of each decoder layer. ``None``: phase C's time split like the forward."""
    saved_bytes_per_s: float = 180e9
    """Estimate only: bytes autograd saves per second of prompt forward. A Llama3-8B-shaped bf16
    layer saves ~170 KB per token and costs ~570 MFLOP per token (P=16k) at ~600 TFLOP/s."""

    def __post_init__(self) -> None:
        for name in ("d2h_gbps", "h2d_gbps", "bidir_gbps", "saved_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Rates.{name} must be > 0, got {getattr(self, name)!r}")
        if not self.copy_slowdown >= 1.0:
            raise ValueError(f"Rates.copy_slowdown must be >= 1, got {self.copy_slowdown!r}")
        for name in ("forward_s", "responses_s", "backward_s"):
            v = getattr(self, name)
            if v is not None and not v >= 0:
                raise ValueError(f"Rates.{name} must be >= 0 seconds or None, got {v!r}")
        for name in ("layer_forward_s", "layer_backward_s"):
            v = getattr(self, name)
            if v is not None and not all(x >= 0 for x in v):
                raise ValueError(f"Rates.{name} must hold seconds >= 0, got {v!r}")
            object.__setattr__(self, name, None if v is None else tuple(map(float, v)))

    @classmethod
    def from_step(cls, stats: Any, **overrides: Any) -> Rates:
        """Rates from a measured reuse step: ``stats.phases["A"|"B"|"C"].seconds`` (a
        :class:`hbmplan.runtime.stats.StepStats`). A step that ran with offload includes its
        exposed copy time; plan from a step without offload where possible."""
        phases: Mapping[str, Any] = stats.phases
        missing = [p for p in "ABC" if p not in phases]
        if missing:
            raise ValueError(f"a reuse step has phases A, B and C; missing {missing}")
        return cls(
            forward_s=float(phases["A"].seconds),
            responses_s=float(phases["B"].seconds),
            backward_s=float(phases["C"].seconds),
            **overrides,
        )

    @classmethod
    def from_ceilings(cls, ceilings: Mapping[str, float], **overrides: Any) -> Rates:
        """Link rates from a ceilings record such as ``measurements/h200_ceilings_*.json``."""
        return cls(
            d2h_gbps=float(ceilings["d2h_pinned_GBps"]),
            h2d_gbps=float(ceilings["h2d_pinned_GBps"]),
            bidir_gbps=float(ceilings["bidir_GBps_total"]),
            copy_slowdown=float(ceilings["gemm_slowdown_under_d2h"]),
            **overrides,
        )


@dataclass(frozen=True)
class Stage:
    """A run of lifetimes saved by one layer, with its compute times.

    Attributes:
        layer: decoder layer (``None``: outside the layers).
        hot_bytes: bytes of its hot lifetimes (always on the device).
        dormant: ``(lifetime id, nbytes)`` of its dormant lifetimes, in capture order.
        forward_s, backward_s: its share of phase A and phase C compute.
    """

    layer: int | None
    hot_bytes: int
    dormant: tuple[tuple[int, int], ...]
    forward_s: float
    backward_s: float
    replay_ok: bool = True
    """The schedule can replay this stage's layer from its first dormant tensor and rebuild the
    rest (see ``PlanInputs.replayable``)."""

    @cached_property
    def dormant_bytes(self) -> int:
        return sum(b for _, b in self.dormant)

    @property
    def recomputable(self) -> bool:
        """A layer stage with something to drop besides its checkpoint: the first tensor the
        layer saves stands for the layer input a recompute restarts from (in a pre-norm decoder
        the input norm saves it first), and is kept or offloaded."""
        return self.layer is not None and len(self.dormant) >= 2 and self.replay_ok


def _split(total: float, weights: Sequence[float]) -> list[float]:
    w = sum(weights)
    if w <= 0:
        return [total / len(weights)] * len(weights) if weights else []
    return [total * x / w for x in weights]


def _stage_times(
    layers: Sequence[int | None],
    weights: Sequence[float],
    total: float,
    per_layer: Sequence[float] | None,
) -> list[float]:
    """A layer's own time split over its stages by weight; what is left of ``total`` split over
    the stages without one (outside the layers, or no per-layer times) by weight."""
    own = [per_layer is not None and x is not None and x < len(per_layer) for x in layers]
    out = [0.0] * len(layers)
    for layer in sorted({x for x, o in zip(layers, own, strict=True) if o}):
        ks = [k for k, x in enumerate(layers) if x == layer]
        for k, t in zip(ks, _split(per_layer[layer], [weights[k] for k in ks]), strict=True):
            out[k] = t
    rest = [k for k, o in enumerate(own) if not o]
    leftover = _split(max(0.0, total - sum(out)), [weights[k] for k in rest])
    for k, t in zip(rest, leftover, strict=True):
        out[k] = t
    return out


def build_stages(
    lifetimes: Sequence[Any],
    rates: Rates,
    replayable: Mapping[int, frozenset[int]] | None = None,
) -> tuple[list[Stage], float]:
    """Stages of ``lifetimes`` (sorted by id) and phase B's compute seconds. ``replayable``: per
    layer a replay can rebuild, the lifetime ids it rebuilds; a stage may recompute only if its
    layer's replay rebuilds all its dormant lifetimes but the first, which it keeps or offloads
    (``None``: any layer stage may)."""
    runs: list[list[Any]] = []
    for lt in sorted(lifetimes, key=lambda lt: lt.id):
        if runs and runs[-1][0].layer == lt.layer:
            runs[-1].append(lt)
        else:
            runs.append([lt])
    layers = [run[0].layer for run in runs]
    weights = [float(sum(lt.nbytes for lt in run)) for run in runs]
    if rates.forward_s is not None:
        fwd_total = rates.forward_s
    elif rates.layer_forward_s is not None:
        fwd_total = sum(rates.layer_forward_s)
    else:
        fwd_total = sum(weights) / rates.saved_bytes_per_s
    fwd = _stage_times(layers, weights, fwd_total, rates.layer_forward_s)
    if rates.backward_s is not None:
        bwd_total = rates.backward_s
    elif rates.layer_backward_s is not None:
        bwd_total = sum(rates.layer_backward_s)
    else:
        bwd_total = 2.0 * fwd_total
    bwd_weights = fwd if sum(fwd) > 0 else weights
    bwd = _stage_times(layers, bwd_weights, bwd_total, rates.layer_backward_s)
    stages = [
        Stage(
            layer=run[0].layer,
            hot_bytes=sum(lt.nbytes for lt in run if lt.hot),
            dormant=tuple((lt.id, lt.nbytes) for lt in run if not lt.hot),
            forward_s=f,
            backward_s=b,
            replay_ok=_replay_ok(run, replayable),
        )
        for run, f, b in zip(runs, fwd, bwd, strict=True)
    ]
    responses = rates.responses_s if rates.responses_s is not None else 3.0 * fwd_total
    return stages, responses


def _replay_ok(run: Sequence[Any], replayable: Mapping[int, frozenset[int]] | None) -> bool:
    if replayable is None:
        return True
    layer, dormant = run[0].layer, [lt.id for lt in run if not lt.hot]
    return layer in replayable and set(dormant[1:]) <= replayable[layer]


def simulate(
    work: Sequence[float],
    copies: Sequence[float],
    work_waits: Sequence[int | None],
    copy_waits: Sequence[int | None],
    slowdown: float,
) -> tuple[list[float], list[float]]:
    """End times of a compute stream and a copy stream, each running its tasks in order.

    ``work[i]`` are compute seconds at full speed; compute runs ``slowdown`` times slower while a
    copy runs. ``copies[i]`` are copy seconds. ``work_waits[i]``: index of the copy that must be
    complete before compute task ``i`` starts (``None``: no wait); ``copy_waits[i]``: index of
    the compute task that must be complete before copy ``i`` starts.
    """
    m, p = len(work), len(copies)
    work_end, copy_end = [0.0] * m, [0.0] * p
    t, ci, xi = 0.0, 0, 0
    c_left: float | None = None
    x_left: float | None = None
    while True:
        moved = True  # start what may start; finish zero-length tasks at once
        while moved:
            moved = False
            if c_left is None and ci < m and (work_waits[ci] is None or work_waits[ci] < xi):
                c_left = work[ci]
            if c_left is not None and c_left <= 0.0:
                work_end[ci], ci, c_left, moved = t, ci + 1, None, True
            if x_left is None and xi < p and (copy_waits[xi] is None or copy_waits[xi] < ci):
                x_left = copies[xi]
            if x_left is not None and x_left <= 0.0:
                copy_end[xi], xi, x_left, moved = t, xi + 1, None, True
        if ci == m and xi == p:
            return work_end, copy_end
        assert c_left is not None or x_left is not None, "timeline deadlock: waits form a cycle"
        slow = slowdown if x_left is not None else 1.0
        dc = c_left * slow if c_left is not None else math.inf
        dx = x_left if x_left is not None else math.inf
        dt = min(dc, dx)
        t += dt
        if c_left is not None:
            c_left = 0.0 if dc <= dx else c_left - dt / slow
        if x_left is not None:
            x_left = 0.0 if dx <= dc else x_left - dt


def exposure_ab(
    stages: Sequence[Stage], responses_s: float, offloaded: Sequence[int], rates: Rates, lag: int
) -> float:
    """Exposed seconds of the offloads in phases A and B; see the module doc."""
    n = len(stages)
    fwd = [s.forward_s for s in stages]
    d2h = [b / (rates.d2h_gbps * _GB) for b in offloaded]
    # compute k waits for copy k-1-lag; phase B (task n) waits for copy n-1-lag
    waits = [k - 1 - lag if k - 1 - lag >= 0 else None for k in range(n + 1)]
    work_end, copy_end = simulate(
        [*fwd, responses_s], d2h, waits, list(range(n)), rates.copy_slowdown
    )
    return max(0.0, max([work_end[-1], *copy_end]) - (sum(fwd) + responses_s))


def exposure_c(
    stages: Sequence[Stage],
    offloaded: Sequence[int],
    recomputed: Sequence[bool],
    rates: Rates,
    depth: int,
) -> float:
    """Exposed seconds of phase C: reloads not hidden by the backward, plus recompute."""
    n = len(stages)
    # task t is stage n-1-t; reload t waits for the backward of task t-depth-1
    order = list(reversed(range(n)))
    work = [stages[j].backward_s + (stages[j].forward_s if recomputed[j] else 0.0) for j in order]
    h2d = [offloaded[j] / (rates.h2d_gbps * _GB) for j in order]
    copy_waits = [t - depth - 1 if t - depth - 1 >= 0 else None for t in range(n)]
    work_end, _ = simulate(work, h2d, list(range(n)), copy_waits, rates.copy_slowdown)
    # summed in the simulator's order, so a timeline without copies exposes exactly 0
    return max(0.0, (work_end[-1] if n else 0.0) - sum(stages[j].backward_s for j in order))


def peaks(
    hot: Sequence[int],
    kept: Sequence[int],
    offloaded: Sequence[int],
    recomputed: Sequence[int],
    *,
    hot_extra: int,
    working: tuple[int, int, int],
    lag: int,
    depth: int,
) -> tuple[int, int, int]:
    """Peak device bytes of phases A, B and C.

    Per stage ``k``: ``hot``/``kept`` bytes stay on the device from birth to the end of C;
    ``offloaded`` bytes are on the device from birth until their copy completes, which the lag
    bounds; ``recomputed`` bytes exist only during the stage's backward in C.

    * A, at the end of stage k: ``sum(hot + kept, stages <= k) + sum(offloaded, k-lag..k)``.
    * B: ``all hot + kept + hot_extra + sum(offloaded, last lag stages)``.
    * C, during stage j's backward: ``all hot + kept + hot_extra + offloaded[j] + recomputed[j]
      + sum(offloaded, j-depth..j-1)`` (the prefetch window).

    Each phase adds its ``working`` bytes (A, B, C): transient memory of the compute itself.
    """
    n = len(hot)
    pre = [0]
    for o in offloaded:
        pre.append(pre[-1] + o)
    peak_a, run = 0, 0
    for k in range(n):
        run += hot[k] + kept[k]
        here = run + pre[k + 1] - pre[max(0, k - lag)]
        if here > peak_a:
            peak_a = here
    base = run + hot_extra
    peak_b = base + pre[n] - pre[max(0, n - lag)]
    peak_c = 0
    for j in range(n):
        here = offloaded[j] + recomputed[j] + pre[j] - pre[max(0, j - depth)]
        if here > peak_c:
            peak_c = here
    return peak_a + working[0], peak_b + working[1], base + peak_c + working[2]


Layout = tuple[list[int], list[int], list[int], list[bool]]
"""Per stage: kept, offloaded and recomputed bytes, and whether the stage recomputes."""


@dataclass(frozen=True)
class Prediction:
    """Peaks and exposed seconds the timeline model predicts for one set of decisions."""

    peak_a_bytes: int
    """Phase A peak device bytes."""
    peak_b_bytes: int
    """Phase B peak device bytes."""
    peak_c_bytes: int
    """Phase C peak device bytes."""
    exposed_ab_s: float
    """Offload time not hidden by phase A+B compute, including the copy slowdown."""
    exposed_c_s: float
    """Reload time not hidden by phase C compute, plus recompute time."""

    @property
    def peak_bytes(self) -> int:
        return max(self.peak_a_bytes, self.peak_b_bytes, self.peak_c_bytes)


class StageModel:
    """Lifetimes cut into stages, with what the model predicts for per-stage decisions.

    Args:
        lifetimes: the saved storages of phase A (``Lifetime``), any order.
        rates: link and compute rates.
        hot_extra: bytes of the gradient cache (born in B, on the device through C).
        working: transient bytes of phases A, B and C.
    """

    def __init__(
        self,
        lifetimes: Sequence[Any],
        rates: Rates,
        hot_extra: int = 0,
        working: tuple[int, int, int] = (0, 0, 0),
        replayable: Mapping[int, frozenset[int]] | None = None,
    ) -> None:
        self.rates, self.hot_extra, self.working = rates, hot_extra, working
        self.stages, self.responses_s = build_stages(lifetimes, rates, replayable)
        self.n = len(self.stages)

    def recompute_flags(self, r: int) -> list[bool]:
        """Recompute the top ``r`` recomputable layers (their reloads would be least hidden)."""
        top = [k for k in reversed(range(self.n)) if self.stages[k].recomputable][:r]
        return [k in top for k in range(self.n)]

    def layout(self, offloaded: Sequence[tuple[int, int]], rec: Sequence[bool]) -> Layout:
        """Per-stage (kept, offloaded, recomputed) bytes; ``offloaded``: (stage, nbytes)."""
        off = [0] * self.n
        for k, b in offloaded:
            off[k] += b
        dropped = [
            s.dormant_bytes - s.dormant[0][1] if r else 0
            for s, r in zip(self.stages, rec, strict=True)
        ]
        kept = [s.dormant_bytes - o - d for s, o, d in zip(self.stages, off, dropped, strict=True)]
        return kept, off, dropped, list(rec)

    def peaks(self, lay: Layout, lag: int, depth: int) -> tuple[int, int, int]:
        hot = [s.hot_bytes for s in self.stages]
        return peaks(
            hot, *lay[:3], hot_extra=self.hot_extra, working=self.working, lag=lag, depth=depth
        )

    def exposed_ab(self, lay: Layout, lag: int) -> float:
        return exposure_ab(self.stages, self.responses_s, lay[1], self.rates, lag)

    def exposed_c(self, lay: Layout, depth: int) -> float:
        return exposure_c(self.stages, lay[1], lay[3], self.rates, depth)

    def predict(self, lay: Layout, lag: int, depth: int) -> Prediction:
        """Peaks and exposed seconds of a layout with offload lag and prefetch depth."""
        if sum(lay[1]) == 0:
            lag = depth = 0
        pa, pb, pc = self.peaks(lay, lag, depth)
        return Prediction(pa, pb, pc, self.exposed_ab(lay, lag), self.exposed_c(lay, depth))
