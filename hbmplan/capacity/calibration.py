"""Calibration of the byte model against one measured step: ``scale`` = measured / predicted
activation bytes, fitted by least squares over the phases of one reuse and one dense step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hbmplan.capacity.layer_bytes import cuda_masked_gqa_fused
from hbmplan.capacity.presets import model_spec
from hbmplan.capacity.step_bytes import estimate_step

__all__ = ["Calibration", "calibrate_scale"]


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
