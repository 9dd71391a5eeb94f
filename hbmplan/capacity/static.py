"""Memory that lives through the whole step on one device: parameters, gradients and optimizer
state, divided by the sharding (:class:`Shards`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from hbmplan.capacity.presets import ModelSpec
from hbmplan.capacity.step_bytes import to_dtype

__all__ = [
    "OPTIMIZERS",
    "Optimizer",
    "Shards",
    "StaticMemory",
    "reuse_static_memory",
    "static_memory",
    "tp_problem",
]

Optimizer = Literal["adamw", "sgd", "none"]
_OPTIMIZER_BYTES = {"adamw": 8, "sgd": 4, "none": 0}  # fp32 state bytes per parameter
OPTIMIZERS: tuple[Optimizer, ...] = ("adamw", "sgd", "none")


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
    cp: int = 1
    """Context-parallel degree: divides the prompt's activations, K/V and gradient cache (the
    reuse schedule) or each trajectory (dense); parameters are replicated over it. See
    :func:`hbmplan.capacity.step_bytes.estimate_step`'s ``cp``."""

    def __post_init__(self) -> None:
        for name in ("fsdp", "tp", "cp"):
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


def reuse_static_memory(
    static: StaticMemory,
    spec: ModelSpec,
    dtype: str | torch.dtype,
    shards: Shards,
    grad_sync: str = "phase-c",
) -> StaticMemory:
    """``static`` as a reuse step under FSDP2 holds it (:mod:`hbmplan.distributed`): every
    parameter stays gathered through the step (``N / tp`` elements), and with
    ``grad_sync="phase-c"`` so do the gradients until the reduce-scatter after phase C (the
    sharded ones are made then, as the unsharded ones go); ``"every-microbatch"`` keeps FSDP's
    gradient layout. Never more than without FSDP, so the frontier still grows with ``fsdp``. Unchanged without FSDP
    (``shards.fsdp == 1``)."""
    if shards.fsdp == 1:
        return static
    if grad_sync not in ("phase-c", "every-microbatch"):
        raise ValueError(f"grad_sync must be 'phase-c' or 'every-microbatch', got {grad_sync!r}")
    item = to_dtype(dtype).itemsize
    full = math.ceil(spec.num_parameters / shards.tp * item)
    grads = full if grad_sync == "phase-c" else static.gradients
    return StaticMemory(parameters=full, gradients=grads, optimizer=static.optimizer)
