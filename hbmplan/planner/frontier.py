"""Capacity frontier: the longest prompt each schedule trains within an HBM budget (an estimate
from :mod:`hbmplan.planner.activations`, optionally calibrated against one measured step)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from hbmplan.planner.activations import (
    SCHEDULES,
    PhaseBytes,
    Schedule,
    Target,
    cuda_masked_gqa_fused,
    estimate_step,
    prompt_layer_bytes,
    resolve_packed,
    to_dtype,
)
from hbmplan.planner.presets import ModelSpec, model_spec
from hbmplan.planner.steptime import CARDS, Card, StepTime, candidate_plans, step_time

__all__ = [
    "Calibration",
    "FrontierResult",
    "ScheduleFrontier",
    "Shards",
    "StaticMemory",
    "calibrate_scale",
    "frontier",
    "static_memory",
    "tp_problem",
]

Optimizer = Literal["adamw", "sgd", "none"]
_OPTIMIZER_BYTES = {"adamw": 8, "sgd": 4, "none": 0}  # fp32 state bytes per parameter
GiB = 2**30


@dataclass(frozen=True)
class Shards:
    """Sharding degrees of one device's share of the model.

    ``fsdp`` divides parameters, gradients and optimizer state (ZeRO-3); each device still holds
    two gathered layers' full parameters and gradients while they compute. ``tp`` divides
    parameters, gradients and optimizer state, and the head-, FFN- and vocabulary-wide
    activations (q/k/v/attention output, K/V and the gradient cache, MLP, log-probs); the
    h-wide residual stream and norm inputs stay replicated (no sequence parallelism).
    """

    fsdp: int = 1
    """Fully sharded data-parallel degree."""
    tp: int = 1
    """Tensor-parallel degree; :func:`frontier` requires it to divide the model's query and
    key/value heads (see :func:`tp_problem`)."""

    def __post_init__(self) -> None:
        for name in ("fsdp", "tp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"shards.{name} must be an int >= 1, got {v!r}")


def tp_problem(spec: ModelSpec, tp: int) -> str | None:
    """Why ``tp`` cannot shard ``spec`` by heads, or ``None``: each rank holds whole query
    heads and whole key/value heads (column-parallel q/k/v), so ``tp`` divides both counts."""
    if spec.num_heads % tp or spec.num_kv_heads % tp:
        valid = [d for d in range(1, spec.num_kv_heads + 1) if spec.num_kv_heads % d == 0]
        return (
            f"must divide the model's {spec.num_heads} query heads and {spec.num_kv_heads} "
            f"key/value heads (one of {valid}), got {tp}"
        )
    return None


@dataclass(frozen=True)
class StaticMemory:
    """Bytes that live through the whole step on one device."""

    parameters: int
    """Parameters in the model dtype (local shard plus gathered layers)."""
    gradients: int
    """Gradients in the model dtype (same layout as the parameters)."""
    optimizer: int
    """Optimizer state: AdamW two fp32 moments (8 B/param), SGD one fp32 momentum (4 B/param),
    plus an fp32 master copy (4 B/param) with ``master_weights`` for 16-bit models."""

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


def static_memory(
    spec: ModelSpec,
    dtype: str | torch.dtype,
    optimizer: Optimizer = "adamw",
    shards: Shards = Shards(),
    master_weights: bool = False,
) -> StaticMemory:
    """Parameters, gradients and optimizer state per device.

    With N parameters and g those of the two largest layers: resident parameter elements are
    ``(g + (N - g) / fsdp) / tp`` (``N / tp`` without FSDP); optimizer elements ``N / (fsdp tp)``.
    """
    if optimizer not in _OPTIMIZER_BYTES:
        raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZER_BYTES)}, got {optimizer!r}")
    dtype = to_dtype(dtype)
    N = spec.num_parameters
    g = min(2, spec.num_layers) * max(
        spec.layer_parameters(spec.moe_layers > 0), spec.layer_parameters(False)
    )
    g = min(g, N)
    resident = (g + (N - g) / shards.fsdp) / shards.tp
    local = N / (shards.fsdp * shards.tp)
    state = _OPTIMIZER_BYTES[optimizer] + (4 if master_weights and dtype.itemsize < 4 else 0)
    return StaticMemory(
        parameters=math.ceil(resident * dtype.itemsize),
        gradients=math.ceil(resident * dtype.itemsize),
        optimizer=math.ceil(local * state),
    )


@dataclass(frozen=True)
class Calibration:
    """One measured step against the byte model; ``scale`` multiplies every predicted
    activation byte (all :class:`PhaseBytes` components) in the frontier."""

    scale: float
    """Least-squares fit of measured = scale x predicted over the phases below."""
    source: str
    """"held-tensors" (CPU accounting), "cuda-allocator" (max_memory_allocated) or "given"."""
    measured: dict[str, int] = field(default_factory=dict)
    """Per phase ("A", "B", "C" of reuse, "dense"): measured bytes above parameters/gradients."""
    predicted: dict[str, int] = field(default_factory=dict)
    """Per phase: the byte model's prediction for the same step."""
    shape: tuple[int, int, int] = (0, 0, 0)
    """(P, S, G) of the measured group."""


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


def _check_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _measure_phases(model: torch.nn.Module, P: int, S: int, G: int) -> tuple[dict[str, int], str]:
    """Measured peak bytes above parameters and gradients of one reuse and one dense step."""
    from hbmplan.atomic import GradStash
    from hbmplan.group import Group
    from hbmplan.models.adapter import adapt
    from hbmplan.schedules import dense_step, reuse_step

    adapter = adapt(model)
    p0 = next(iter(adapter.model.parameters()))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, adapter.vocab_size, (P + G * S,), generator=gen).to(p0.device)
    group = Group(prompt=ids[:P].clone(), responses=[ids[P + i * S : P + (i + 1) * S].clone()
                                                     for i in range(G)])  # fmt: skip
    cuda = p0.device.type == "cuda"
    stash = GradStash(adapter.model.parameters())
    measured: dict[str, int] = {}
    try:
        base = 0
        if cuda:  # gradients exist up front so that the baseline holds them
            for p in adapter.model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            torch.cuda.synchronize(p0.device)
            base = torch.cuda.memory_allocated(p0.device)
        for step in (reuse_step, dense_step):
            stats = step(adapter, [group], lambda lp, g, i: -lp.sum())
            measured |= {k: v.peak_bytes - base for k, v in stats.phases.items()}
    finally:
        stash.restore()
    return measured, "cuda-allocator" if cuda else "held-tensors"


def calibrate_scale(
    model: torch.nn.Module,
    prompt_len: int | None = None,
    response_len: int = 16,
    group_size: int = 2,
    fused_gqa: bool | None = None,
) -> Calibration:
    """Measure one reuse and one dense step of ``model`` (a ``ReferenceDecoder`` or supported
    Hugging Face model, on CPU or CUDA) and fit ``scale`` = measured / predicted activation bytes.

    The group is random token ids, ``prompt_len`` (default 64 on CPU, 512 on CUDA) by
    ``group_size`` x ``response_len``. The model's ``.grad`` are left exactly as they were.
    ``fused_gqa`` (CUDA only) defaults to :func:`cuda_masked_gqa_fused` of the model's device.
    """
    p0 = next(iter(model.parameters()))
    cuda = p0.device.type == "cuda"
    P = prompt_len or (512 if cuda else 64)
    if fused_gqa is None:
        fused_gqa = cuda and cuda_masked_gqa_fused(p0.device)
    measured, source = _measure_phases(model, P, response_len, group_size)
    spec, target = model_spec(model), "cuda" if cuda else "cpu"
    predicted = {}
    for schedule in ("reuse", "dense"):
        est = estimate_step(
            spec, P, [response_len] * group_size, schedule, p0.dtype, target=target,
            fused_gqa=fused_gqa,
        )  # fmt: skip
        predicted |= {k: v.total for k, v in est.items()}
    num = sum(measured[k] * predicted[k] for k in predicted)
    scale = num / sum(v * v for v in predicted.values())
    return Calibration(scale, source, measured, predicted, (P, response_len, group_size))


def frontier(
    model_or_config: Any,
    hbm: int | str,
    group_size: int,
    response_len: int,
    schedules: Sequence[Schedule] = SCHEDULES,
    dtype: str | torch.dtype = "bfloat16",
    optimizer: Optimizer = "adamw",
    shards: Shards = Shards(),
    calibrate: torch.nn.Module | Calibration | float | None = None,
    *,
    fragmentation: float = 0.05,
    rows_per_microbatch: int = 1,
    master_weights: bool = False,
    grad_cache_dtype: str | torch.dtype | None = None,
    prefetch_layers: int = 2,
    target: Target = "cuda",
    fused_gqa: bool = False,
    offload_during_a: bool = True,
    attention: str = "auto",
    max_prompt_len: int = 1 << 22,
    prompt_len: int | None = None,
    card: str | Card | None = "h200",
) -> FrontierResult:
    """ESTIMATE, per schedule, the longest prompt P whose training step fits in ``hbm``.

    A step fits when, in every phase, static memory (parameters, gradients, optimizer state, per
    :class:`Shards`) plus ``scale`` x predicted activation bytes (see
    :func:`hbmplan.planner.activations.estimate_step`) stays within ``hbm x (1 - fragmentation)``.
    Peaks grow with P, so P is found by binary search. Each schedule's step time at one prompt
    length (``prompt_len``) is ESTIMATED too, from its FLOPs and ``card``'s measured rates
    (:func:`hbmplan.planner.steptime.step_time`), so that capacity and speed show side by side.

    Args:
        model_or_config: preset name ("llama3-8b", "qwen3-8b", "qwen3-30b-a3b"), path to a
            ``config.json`` (or its directory), a Hugging Face config or model, an hbmplan
            ``DecoderConfig``/``ReferenceDecoder``, or a :class:`ModelSpec`.
        hbm: device memory, bytes or a string such as "80GiB".
        group_size: G responses per prompt.
        response_len: S tokens per response.
        schedules: any of :data:`~hbmplan.planner.activations.SCHEDULES`: "dense",
            "dense+ckpt", "reuse", "reuse+recompute", "reuse+offload",
            "reuse+offload+recompute" (see ``estimate_step``).
        dtype: parameter and activation dtype.
        optimizer: "adamw", "sgd" or "none" (see :class:`StaticMemory`).
        shards: sharding degrees (see :class:`Shards`); ``tp`` must divide the model's query
            and key/value heads.
        calibrate: a model to measure one step of (see :func:`calibrate_scale`), a
            :class:`Calibration`, a scale factor, or ``None`` (scale 1).
        fragmentation: fraction of ``hbm`` kept free.
        rows_per_microbatch: trajectories (dense) or responses (reuse) per microbatch, at most G.
        master_weights: count an fp32 master copy of 16-bit parameters.
        grad_cache_dtype: gK/gV accumulation dtype; default fp32 for 16-bit models.
        prefetch_layers: the offload schedules' window of prompt layers on the device.
        target: "cuda" (CUDA kernels and transients) or "cpu" (held saved tensors only).
        fused_gqa: CUDA's memory-efficient SDPA takes GQA with a mask (see ``estimate_step``).
        offload_during_a: reuse+offload streams to the host during phase A (see ``estimate_step``).
        attention: the reuse schedules' phase-B attention, as ``reuse_step(attention=...)``:
            "auto" (the Triton prefix-attention kernel over packed rows on CUDA when it takes the
            head dim, dtype and gradient-cache dtype), "triton" or "padded" (the kernel's
            PyTorch reference has no byte model). Sliding windows are not modelled: a model
            whose window is shorter than the context runs padded rows.
        max_prompt_len: upper end of the search.
        prompt_len: P at which to estimate step times; default: the longest prompt every
            schedule that fits at all can train.
        card: whose measured rates time the step (a name in
            :data:`~hbmplan.planner.steptime.CARDS` or a :class:`~hbmplan.planner.steptime.Card`);
            ``None``: no step times. Only 16-bit models on ``target="cuda"`` get times.
    """
    from hbmplan.memory import parse_bytes

    spec, dt = model_spec(model_or_config), to_dtype(dtype)
    try:
        hbm_bytes = parse_bytes(hbm)
    except (TypeError, ValueError):
        raise ValueError(
            f"hbm must be a positive byte count or a size like '80GiB', got {hbm!r}"
        ) from None
    G, S = _check_int("group_size", group_size), _check_int("response_len", response_len)
    rows = _check_int("rows_per_microbatch", rows_per_microbatch)
    _check_int("max_prompt_len", max_prompt_len, 2)
    if isinstance(schedules, str) or not schedules or any(x not in SCHEDULES for x in schedules):
        raise ValueError(f"schedules must be a non-empty list from {SCHEDULES}, got {schedules!r}")
    resolve_packed(attention, spec, dt, target, grad_cache_dtype)  # checks it before a search
    if not 0.0 <= fragmentation < 1.0:
        raise ValueError(f"fragmentation must lie in [0, 1), got {fragmentation!r}")
    if not isinstance(shards, Shards):
        raise TypeError(f"shards must be an hbmplan Shards, got {type(shards).__name__}")
    problem = tp_problem(spec, shards.tp)
    if problem is not None:
        raise ValueError(f"shards.tp {problem}")
    if prompt_len is not None:
        _check_int("prompt_len", prompt_len, 2)
    if isinstance(card, str):
        if card not in CARDS:
            raise ValueError(f"card must be one of {sorted(CARDS)}, got {card!r}")
        card = CARDS[card]
    elif card is not None and not isinstance(card, Card):
        raise TypeError(f"card must be a name, a Card or None, got {type(card).__name__}")
    if isinstance(calibrate, torch.nn.Module):
        calibration = calibrate_scale(calibrate)
    elif isinstance(calibrate, Calibration):
        calibration = calibrate
    elif calibrate is None:
        calibration = None
    elif isinstance(calibrate, (int, float)) and not isinstance(calibrate, bool) and calibrate > 0:
        calibration = Calibration(float(calibrate), "given")
    else:
        raise ValueError(
            f"calibrate must be a model, a Calibration or a scale > 0, got {calibrate!r}"
        )
    scale = calibration.scale if calibration is not None else 1.0
    static = static_memory(spec, dt, optimizer, shards, master_weights)
    usable = int(hbm_bytes * (1.0 - fragmentation))

    def phases(schedule: Schedule, P: int, **plan: int) -> dict[str, PhaseBytes]:
        row_len = S if schedule.startswith("reuse") else P + S - 1
        return estimate_step(
            spec, P, [S] * G, schedule, dt, target=target, tokens_per_microbatch=rows * row_len,
            grad_cache_dtype=grad_cache_dtype, tp=shards.tp, prefetch_layers=prefetch_layers,
            fused_gqa=fused_gqa, offload_during_a=offload_during_a, attention=attention,
            **plan,
        )  # fmt: skip

    def peaks(ph: dict[str, PhaseBytes]) -> dict[str, int]:
        return {k: static.total + math.ceil(v.total * scale) for k, v in ph.items()}

    def fits(schedule: Schedule, P: int, **plan: int) -> bool:
        return max(peaks(phases(schedule, P, **plan)).values()) <= usable

    out: dict[str, ScheduleFrontier] = {}
    for schedule in dict.fromkeys(schedules):
        lo, hi = 0, max_prompt_len + 1  # invariant: lo fits (or is 0), hi does not
        if fits(schedule, 2):
            lo, step = 2, 2
            while lo + step < hi and fits(schedule, lo + step):  # gallop, then bisect
                lo, step = lo + step, step * 2
            hi = min(hi, lo + step)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(schedule, mid) else (lo, mid)
        ph = phases(schedule, max(lo, 2))
        out[schedule] = ScheduleFrontier(
            schedule, lo, lo + S if lo else 0, lo == max_prompt_len, ph, peaks(ph)
        )
    P = prompt_len or min((f.max_prompt_len for f in out.values() if f.max_prompt_len), default=0)
    timed = card is not None and target == "cuda" and dt.itemsize == 2
    if timed and P:
        layer_bytes = prompt_layer_bytes(spec, P, dt, target=target, tp=shards.tp,
                                          fused_gqa=fused_gqa)  # fmt: skip
        plans = candidate_plans(spec.num_layers, lambda name, **kw: fits(name, P, **kw))
        for name, f in out.items():
            if f.max_prompt_len >= P:
                t = step_time(
                    spec, P, [S] * G, name, card, tp=shards.tp, layer_bytes=layer_bytes,
                    prefetch_layers=prefetch_layers, plans=plans.get(name),
                )  # fmt: skip
                out[name] = dataclasses.replace(f, time=t)
    return FrontierResult(
        model=spec, dtype=dt, hbm_bytes=hbm_bytes, usable_bytes=usable,
        fragmentation=fragmentation, group_size=G, response_len=S, rows_per_microbatch=rows,
        optimizer=optimizer, shards=shards, static=static, schedules=out,
        calibration=calibration, target=target, prompt_len=P, card=card if timed else None,
    )  # fmt: skip
