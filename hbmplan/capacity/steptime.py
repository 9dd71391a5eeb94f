"""ESTIMATED step time of the frontier's schedules: their FLOPs at a card's measured training
rate, plus the host copies and recomputation the planner's timeline model leaves exposed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hbmplan.capacity.flops import (
    attention_flops,
    dense_flops,
    linear_flops_per_token,
    reuse_flops,
)
from hbmplan.capacity.presets import ModelSpec
from hbmplan.planner.timeline import Rates, Stage, exposure_ab, exposure_c

__all__ = [
    "CARDS",
    "H200",
    "LOWEST_PLANS",
    "Card",
    "Plan",
    "StepTime",
    "candidate_plans",
    "step_time",
]


@dataclass(frozen=True)
class Card:
    """Measured rates of one device model, for 16-bit training."""

    name: str
    """Short name ("h200")."""
    flops: float
    """FLOP/s the dense trainer achieves in bf16 (FLOPs counted as :mod:`hbmplan.capacity.flops` does)."""
    flops_range: tuple[float, float]
    """The measured spread of ``flops`` (``flops`` is its midpoint)."""
    d2h_gbps: float
    """Device-to-host copy rate into pinned memory, GB/s (1e9 bytes)."""
    h2d_gbps: float
    """Host-to-device copy rate from pinned memory, GB/s."""
    copy_slowdown: float
    """Factor by which compute slows while a copy runs."""
    source: str
    """Where the numbers were measured."""

    def rates(self) -> Rates:
        """The planner's timeline rates for this card's links."""
        return Rates(
            d2h_gbps=self.d2h_gbps, h2d_gbps=self.h2d_gbps, copy_slowdown=self.copy_slowdown
        )


H200 = Card(
    name="h200",
    flops=517e12,
    flops_range=(505e12, 529e12),
    d2h_gbps=55.3,
    h2d_gbps=55.5,
    copy_slowdown=1.113,
    source=(
        "one NVIDIA H200, torch 2.11, bf16: the dense trainer on four Llama3-8B-shaped layers "
        "at 505-529 TFLOP/s; pinned copies and the GEMM slowdown under a copy "
        "(benchmarks/results/h200_ceilings_2026-11.md and .json)"
    ),
)
"""The only card measured so far. Its bf16 GEMM ceiling is 795 TFLOP/s; training runs at ~65%
of it, which is the rate used here."""

CARDS: dict[str, Card] = {"h200": H200}


Plan = tuple[int, int, bool]
"""A reuse schedule's plan as the time estimate sees it: (offloaded, recomputed, checkpoints
moved): the first ``offloaded`` prompt layers copy their dormant tensors to the host and back,
the last ``recomputed`` layers drop them and run their forward again in phase C, their
checkpoints (layer inputs) copied too when the flag is set."""

LOWEST_PLANS = {
    "reuse": lambda L: (0, 0, False),
    "reuse+offload": lambda L: (L, 0, False),
    "reuse+recompute": lambda L: (0, L, False),
    "reuse+offload+recompute": lambda L: (0, L, True),
}
"""Each reuse schedule's plan at its frontier (the byte model's), for ``L`` layers."""


@dataclass(frozen=True)
class StepTime:
    """ESTIMATED seconds of one group's training step on one device (no communication)."""

    seconds: float
    """``compute_s + exposed_s``."""
    compute_s: float
    """The schedule's FLOPs, recomputation excluded, at the card's rate."""
    exposed_s: float
    """Host copies that compute does not hide, plus recomputation."""
    flops: float
    """FLOPs per device, recomputation included."""
    recomputed_layers: int
    """Prompt layers (reuse) or layers per trajectory (dense+ckpt) run forward twice."""


def candidate_plans(L: int, fits: Callable[..., bool]) -> dict[str, list[Plan]]:
    """Per reuse schedule that moves or recomputes, the plans the planner would choose among at
    one prompt length: as few of the ``L`` layers recomputed, or offloaded, as fit; with both
    allowed, either of those, or every layer moved (whole, or its checkpoint after a recompute)
    when that fits. ``fits(schedule, recompute_layers=..., offload_layers=...)`` says whether a
    plan's peak fits (see :func:`hbmplan.capacity.step_bytes.estimate_step`)."""
    out: dict[str, list[Plan]] = {}
    if fits("reuse+recompute"):
        r = next(r for r in range(L + 1) if fits("reuse+recompute", recompute_layers=r))
        out["reuse+recompute"] = [(0, r, False)]
    if fits("reuse+offload"):
        k = next(k for k in range(L + 1) if fits("reuse+offload", offload_layers=k))
        out["reuse+offload"] = [(k, 0, False)]
    both = [*out.get("reuse+recompute", []), *out.get("reuse+offload", [])]
    if "reuse+offload" in out:  # every layer moved, whole or as a checkpoint
        both += [(L - r, r, True) for r in range(L + 1)]
    out["reuse+offload+recompute"] = both or [(0, L, True)]
    return out


def _prompt_layer_flops(spec: ModelSpec, prompt_len: int) -> int:
    """Forward FLOPs of one decoder layer over the shared prompt ``p[:-1]``."""
    Pm = prompt_len - 1
    return linear_flops_per_token(spec) * Pm + attention_flops(spec, Pm, 0)


def step_time(
    spec: ModelSpec,
    prompt_len: int,
    response_lens: Sequence[int],
    schedule: str,
    card: Card = H200,
    *,
    tp: int = 1,
    layer_bytes: tuple[int, int] = (0, 0),
    prefetch_layers: int = 2,
    plans: Sequence[Plan] | None = None,
) -> StepTime:
    """ESTIMATE one group's step time for a schedule of :func:`hbmplan.frontier`.

    Compute is the FLOP count (:mod:`hbmplan.capacity.flops`; the reuse schedules as executed) divided
    by ``tp`` and by ``card.flops``, the dense trainer's measured rate, for every schedule.
    "dense+ckpt" adds one forward of every layer per trajectory. In the reuse schedules a
    recomputed prompt layer runs its forward again right before its backward in phase C,
    exposed in full, and host copies are timed by the planner's timeline model
    (:mod:`hbmplan.planner.timeline`: D2H under phases A and B, H2D prefetch under C with
    ``prefetch_layers - 1`` layers of lag and depth, compute slowed while a copy runs).

    Args:
        spec: the model's shapes.
        prompt_len: P >= 2. response_lens: S_i of the G responses.
        schedule: a frontier schedule name.
        card: measured rates.
        tp: tensor-parallel degree (divides every FLOP; collectives are not modelled).
        layer_bytes: (dormant, checkpoint) device bytes of one prompt layer
            (:func:`hbmplan.capacity.step_bytes.prompt_layer_bytes`), for the copies.
        prefetch_layers: the offload schedules' window of layers on the device.
        plans: for the reuse schedules, the candidate plans (:data:`Plan`); the least exposed
            is taken. Default: the schedule's lowest plan (what its frontier assumes).
    """
    L = spec.num_layers
    rate = card.flops * tp
    P, lens = prompt_len, list(response_lens)
    if schedule.startswith("dense"):
        flops = dense_flops(spec, P, lens)
        if schedule == "dense+ckpt":
            redo = sum(L * (linear_flops_per_token(spec) * t + attention_flops(spec, t, 0))
                       for t in (P + s - 1 for s in lens))  # fmt: skip
            return StepTime((flops + redo) / rate, flops / rate, redo / rate, flops + redo, L)
        return StepTime(flops / rate, flops / rate, 0.0, flops, 0)

    flops = reuse_flops(spec, P, lens, executed=True)
    layer_f = _prompt_layer_flops(spec, P)  # phase A: L of these
    b_flops = sum(_b_flops(spec, P, s) for s in lens)
    c_flops = flops - L * layer_f - b_flops  # the prompt backward, split evenly over layers
    stages = [Stage(k, 0, (), layer_f / rate, c_flops / L / rate) for k in range(L)]
    responses = b_flops / rate
    rates, lag = card.rates(), max(prefetch_layers - 1, 0)
    dormant, ckpt = layer_bytes
    if plans is None:
        plans = [LOWEST_PLANS[schedule](L)]
    best: tuple[float, int] | None = None
    for offloaded, recomputed, ckpt_moved in plans:
        if offloaded + recomputed > L:
            raise ValueError(f"a plan offloads and recomputes at most {L} layers, got "
                             f"{offloaded} + {recomputed}")  # fmt: skip
        rec = [k >= L - recomputed for k in range(L)]
        moved = [(ckpt if ckpt_moved else 0) if rec[k] else dormant if k < offloaded else 0
                 for k in range(L)]  # fmt: skip
        exposed = exposure_ab(stages, responses, moved, rates, lag) + exposure_c(
            stages, moved, rec, rates, lag
        )
        if best is None or exposed < best[0]:
            best = (exposed, recomputed)
    assert best is not None, "no plan to time"
    exposed, r = best
    return StepTime(flops / rate + exposed, flops / rate, exposed, flops + r * layer_f, r)


def _b_flops(spec: ModelSpec, prompt_len: int, s: int) -> int:
    """Training FLOPs of one response row in phase B (3x its forward)."""
    layer = linear_flops_per_token(spec) * s + attention_flops(spec, s, prompt_len - 1)
    return 3 * (spec.num_layers * layer + 2 * spec.hidden_size * spec.vocab_size * s)
