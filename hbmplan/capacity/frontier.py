"""Capacity frontier: the longest prompt each schedule trains within an HBM budget (an estimate
from :mod:`hbmplan.capacity.step_bytes`, optionally calibrated against one measured step), with
its options as one :class:`FrontierConfig`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hbmplan.capacity.calibration import Calibration, calibrate_scale
from hbmplan.capacity.layer_bytes import Target
from hbmplan.capacity.presets import model_spec
from hbmplan.capacity.result import FrontierResult, ScheduleFrontier
from hbmplan.capacity.static import (
    OPTIMIZERS,
    Optimizer,
    Shards,
    StaticMemory,
    reuse_static_memory,
    static_memory,
    tp_problem,
)
from hbmplan.capacity.step_bytes import (
    SCHEDULES,
    PhaseBytes,
    Schedule,
    estimate_step,
    prompt_layer_bytes,
    resolve_packed,
    to_dtype,
)
from hbmplan.capacity.steptime import CARDS, Card, candidate_plans, step_time
from hbmplan.config import config_or_keywords, parse_bytes

__all__ = [
    "Calibration",
    "FrontierConfig",
    "FrontierResult",
    "ScheduleFrontier",
    "Shards",
    "StaticMemory",
    "calibrate_scale",
    "frontier",
    "static_memory",
    "tp_problem",
]


_ONE_DEVICE = Shards()


def _check_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


@dataclass(frozen=True)
class FrontierConfig:
    """The options of :func:`hbmplan.frontier` beyond the model, ``hbm``, G and S; frozen and
    checked on construction (what needs the model, such as ``shards.tp`` dividing its heads or
    the attention path for its head dim, is checked by :func:`frontier`)."""

    schedules: tuple[Schedule, ...] = SCHEDULES
    """Any of :data:`~hbmplan.capacity.step_bytes.SCHEDULES`: "dense", "dense+ckpt", "reuse",
    "reuse+recompute", "reuse+offload", "reuse+offload+recompute" (see ``estimate_step``)."""
    dtype: str | torch.dtype = "bfloat16"
    """Parameter and activation dtype (a name such as "bf16" is kept as the torch.dtype)."""
    optimizer: Optimizer = "adamw"
    """"adamw", "sgd" or "none" (see :class:`StaticMemory`)."""
    shards: Shards = _ONE_DEVICE
    """Sharding degrees (see :class:`Shards`); ``tp`` must divide the model's heads."""
    calibrate: torch.nn.Module | Calibration | float | None = None
    """A model to measure one step of (see :func:`calibrate_scale`), a :class:`Calibration`, a
    scale factor > 0, or ``None`` (scale 1)."""
    fragmentation: float = 0.05
    """Fraction of ``hbm`` kept free, in [0, 1)."""
    rows_per_microbatch: int = 1
    """Trajectories (dense) or responses (reuse) per microbatch, at most G."""
    master_weights: bool = False
    """Count an fp32 master copy of 16-bit parameters."""
    grad_cache_dtype: str | torch.dtype | None = None
    """gK/gV accumulation dtype; default fp32 for 16-bit models."""
    prefetch_layers: int = 2
    """The offload schedules' window of prompt layers on the device."""
    target: Target = "cuda"
    """"cuda" (CUDA kernels and transients) or "cpu" (held saved tensors only)."""
    fused_gqa: bool = False
    """CUDA's memory-efficient SDPA takes GQA with a mask (see ``estimate_step``)."""
    offload_during_a: bool = True
    """reuse+offload streams to the host during phase A (see ``estimate_step``)."""
    attention: str = "auto"
    """The reuse schedules' phase-B attention, as ``reuse_step(attention=...)``: "auto" (the
    Triton prefix-attention kernel over packed rows on CUDA when it takes the head dim, dtype
    and gradient-cache dtype), "triton" or "padded" (the kernel's PyTorch reference has no byte
    model). Sliding windows are not modelled: a model whose window is shorter than the context
    runs padded rows."""
    max_prompt_len: int = 1 << 22
    """Upper end of the search."""
    prompt_len: int | None = None
    """P at which to estimate step times; default: the longest prompt every schedule that fits
    at all can train."""
    card: str | Card | None = "h200"
    """Whose measured rates time the step (a name in :data:`~hbmplan.capacity.steptime.CARDS`,
    kept as the :class:`~hbmplan.capacity.steptime.Card`); ``None``: no step times. Only 16-bit
    models on ``target="cuda"`` get times."""
    # data parallel
    grad_sync: str | None = None
    """With ``shards.fsdp > 1``, what the reuse schedules hold beside their activations:
    ``None``, FSDP's own layout (two gathered layers), as a per-layer gather schedule would;
    "phase-c" or "every-microbatch", what hbmplan's FSDP2 driver (:mod:`hbmplan.distributed`)
    holds today with that ``grad_sync``: every parameter gathered through the step and, with
    "phase-c", the gradients too (see :func:`~hbmplan.capacity.static.reuse_static_memory`).
    The dense schedules keep FSDP's own layout."""

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("dtype", to_dtype(self.dtype))
        _check_int("rows_per_microbatch", self.rows_per_microbatch)
        _check_int("max_prompt_len", self.max_prompt_len, 2)
        s = self.schedules
        if isinstance(s, str) or not s or any(x not in SCHEDULES for x in s):
            raise ValueError(f"schedules must be a non-empty list from {SCHEDULES}, got {s!r}")
        set_("schedules", tuple(s))
        if not (isinstance(self.fragmentation, (int, float)) and 0.0 <= self.fragmentation < 1.0):
            raise ValueError(f"fragmentation must lie in [0, 1), got {self.fragmentation!r}")
        if not isinstance(self.shards, Shards):
            raise TypeError(f"shards must be an hbmplan Shards, got {type(self.shards).__name__}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.target not in ("cpu", "cuda"):
            raise ValueError(f"target must be 'cpu' or 'cuda', got {self.target!r}")
        if self.prompt_len is not None:
            _check_int("prompt_len", self.prompt_len, 2)
        _check_int("prefetch_layers", self.prefetch_layers)
        for name in ("master_weights", "fused_gqa", "offload_during_a"):
            _check_bool(name, getattr(self, name))
        card = self.card
        if isinstance(card, str):
            if card not in CARDS:
                raise ValueError(f"card must be one of {sorted(CARDS)}, got {card!r}")
            set_("card", CARDS[card])
        elif card is not None and not isinstance(card, Card):
            raise TypeError(f"card must be a name, a Card or None, got {type(card).__name__}")
        if self.grad_sync not in (None, "phase-c", "every-microbatch"):
            raise ValueError(
                f"grad_sync must be None, 'phase-c' or 'every-microbatch', got {self.grad_sync!r}"
            )
        c = self.calibrate
        number = isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0
        if not (c is None or number or isinstance(c, (torch.nn.Module, Calibration))):
            raise ValueError(f"calibrate must be a model, a Calibration or a scale > 0, got {c!r}")

    def calibration(self) -> Calibration | None:
        """The scale to apply: ``calibrate`` as a :class:`Calibration` (a model is measured now)."""
        c = self.calibrate
        if isinstance(c, torch.nn.Module):
            return calibrate_scale(c)
        if c is None or isinstance(c, Calibration):
            return c
        return Calibration(float(c), "given")


def frontier(
    model_or_config: Any,
    hbm: int | str,
    group_size: int,
    response_len: int,
    schedules: Sequence[Schedule] = SCHEDULES,
    dtype: str | torch.dtype = "bfloat16",
    optimizer: Optimizer = "adamw",
    shards: Shards = _ONE_DEVICE,
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
    config: FrontierConfig | None = None,
    grad_sync: str | None = None,
) -> FrontierResult:
    """ESTIMATE, per schedule, the longest prompt P whose training step fits in ``hbm``.

    A step fits when, in every phase, static memory (parameters, gradients, optimizer state, per
    :class:`Shards`) plus ``scale`` x predicted activation bytes (see
    :func:`hbmplan.capacity.step_bytes.estimate_step`) stays within ``hbm x (1 - fragmentation)``.
    Peaks grow with P, so P is found by binary search. Each schedule's step time at one prompt
    length (``prompt_len``) is ESTIMATED too, from its FLOPs and ``card``'s measured rates
    (:func:`hbmplan.capacity.steptime.step_time`), so that capacity and speed show side by side.

    Args:
        model_or_config: preset name ("llama3-8b", "qwen3-8b", "qwen3-30b-a3b"), path to a
            ``config.json`` (or its directory), a Hugging Face config or model, an hbmplan
            ``DecoderConfig``/``ReferenceDecoder``, or a :class:`ModelSpec`.
        hbm: device memory, bytes or a string such as "80GiB".
        group_size: G responses per prompt.
        response_len: S tokens per response.
        schedules, dtype, optimizer, shards, calibrate, fragmentation, rows_per_microbatch,
            master_weights, grad_cache_dtype, prefetch_layers, target, fused_gqa,
            offload_during_a, attention, max_prompt_len, prompt_len, card, grad_sync: the
            options, each documented on :class:`FrontierConfig`.
        config: the options as one :class:`FrontierConfig` instead of keywords (both: a
            ``TypeError``).
    """
    keywords = dict(
        schedules=schedules, dtype=dtype, optimizer=optimizer, shards=shards,
        calibrate=calibrate, fragmentation=fragmentation,
        rows_per_microbatch=rows_per_microbatch, master_weights=master_weights,
        grad_cache_dtype=grad_cache_dtype, prefetch_layers=prefetch_layers, target=target,
        fused_gqa=fused_gqa, offload_during_a=offload_during_a, attention=attention,
        max_prompt_len=max_prompt_len, prompt_len=prompt_len, card=card, grad_sync=grad_sync,
    )  # fmt: skip
    cfg = config_or_keywords(config, FrontierConfig, keywords, "the frontier's options")
    return _search(model_or_config, hbm, group_size, response_len, cfg)


def _search(
    model_or_config: Any, hbm: int | str, G: int, S: int, cfg: FrontierConfig
) -> FrontierResult:
    spec, dt = model_spec(model_or_config), cfg.dtype
    try:
        hbm_bytes = parse_bytes(hbm)
    except (TypeError, ValueError):
        raise ValueError(
            f"hbm must be a positive byte count or a size like '80GiB', got {hbm!r}"
        ) from None
    G, S = _check_int("group_size", G), _check_int("response_len", S)
    rows, target, shards = cfg.rows_per_microbatch, cfg.target, cfg.shards
    resolve_packed(cfg.attention, spec, dt, target, cfg.grad_cache_dtype)  # before a search
    problem = tp_problem(spec, shards.tp)
    if problem is not None:
        raise ValueError(f"shards.tp {problem}")
    calibration = cfg.calibration()
    scale = calibration.scale if calibration is not None else 1.0
    static = static_memory(spec, dt, cfg.optimizer, shards, cfg.master_weights)
    reuse_static = (
        static
        if cfg.grad_sync is None
        else reuse_static_memory(static, spec, dt, shards, cfg.grad_sync)
    )
    usable = int(hbm_bytes * (1.0 - cfg.fragmentation))

    def phases(schedule: Schedule, P: int, **plan: int) -> dict[str, PhaseBytes]:
        row_len = S if schedule.startswith("reuse") else P + S - 1
        return estimate_step(
            spec, P, [S] * G, schedule, dt, target=target, tokens_per_microbatch=rows * row_len,
            grad_cache_dtype=cfg.grad_cache_dtype, tp=shards.tp,
            prefetch_layers=cfg.prefetch_layers, fused_gqa=cfg.fused_gqa,
            offload_during_a=cfg.offload_during_a, attention=cfg.attention, cp=shards.cp,
            **plan,
        )  # fmt: skip

    def peaks(ph: dict[str, PhaseBytes], schedule: Schedule) -> dict[str, int]:
        held = (reuse_static if schedule.startswith("reuse") else static).total
        return {k: held + math.ceil(v.total * scale) for k, v in ph.items()}

    def fits(schedule: Schedule, P: int, **plan: int) -> bool:
        return max(peaks(phases(schedule, P, **plan), schedule).values()) <= usable

    out: dict[str, ScheduleFrontier] = {}
    schedules = dict.fromkeys(cfg.schedules)
    if shards.cp > 1:  # context parallel runs without offload or recompute
        schedules = {s: None for s in schedules if s in ("dense", "reuse")}
    for schedule in schedules:
        lo, hi = 0, cfg.max_prompt_len + 1  # invariant: lo fits (or is 0), hi does not
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
            schedule, lo, lo + S if lo else 0, lo == cfg.max_prompt_len, ph, peaks(ph, schedule)
        )
    P = cfg.prompt_len or min(
        (f.max_prompt_len for f in out.values() if f.max_prompt_len), default=0
    )
    card = cfg.card
    # step times under context parallel are not modelled (its collectives are not timed)
    timed = card is not None and target == "cuda" and dt.itemsize == 2 and shards.cp == 1
    if timed and P:
        layer_bytes = prompt_layer_bytes(spec, P, dt, target=target, tp=shards.tp,
                                          fused_gqa=cfg.fused_gqa)  # fmt: skip
        plans = candidate_plans(spec.num_layers, lambda name, **kw: fits(name, P, **kw))
        for name, f in out.items():
            if f.max_prompt_len >= P:
                t = step_time(
                    spec, P, [S] * G, name, card, tp=shards.tp, layer_bytes=layer_bytes,
                    prefetch_layers=cfg.prefetch_layers, plans=plans.get(name),
                )  # fmt: skip
                out[name] = dataclasses.replace(f, time=t)
    return FrontierResult(
        model=spec, dtype=dt, hbm_bytes=hbm_bytes, usable_bytes=usable,
        fragmentation=cfg.fragmentation, group_size=G, response_len=S, rows_per_microbatch=rows,
        optimizer=cfg.optimizer, shards=shards, static=static, schedules=out,
        calibration=calibration, target=target, prompt_len=P, card=card if timed else None,
    )  # fmt: skip
