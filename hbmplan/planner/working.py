"""Working sets for :class:`hbmplan.planner.PlanInputs`, from plain numbers: a layer's forward
or backward (phases A and C) and the largest phase-B microbatch."""

from __future__ import annotations

from collections.abc import Sequence

from hbmplan.planner.lifetimes import Lifetime

__all__ = ["layer_working_bytes", "phase_b_working_bytes"]


def layer_working_bytes(lifetimes: Sequence[Lifetime]) -> int:
    """The largest layer's saved bytes: the transient memory of one layer's forward (phase A)
    or backward and replay (phase C)."""
    per_layer: dict[int | None, int] = {}
    for lt in lifetimes:
        per_layer[lt.layer] = per_layer.get(lt.layer, 0) + lt.nbytes
    return max(per_layer.values(), default=0)


def phase_b_working_bytes(
    per_token: float,
    microbatches: Sequence[tuple[int, int, int]],
    kv_bytes: int,
    kv_copies: bool,
) -> int:
    """Phase B's working set, estimated before phase B runs: the largest microbatch's.

    Args:
        per_token: the prompt's saved bytes per prompt token (a microbatch token saves about as
            much).
        microbatches: (rows, tokens, log-prob working bytes) of each microbatch; tokens count
            padding.
        kv_bytes: the prompt K/V, all layers.
        kv_copies: each row holds the prompt K/V twice (the concatenation and its transient);
            ``False`` when attention reads them in place.
    """
    copies = 2 if kv_copies else 0
    return max(
        (
            int(per_token * tokens) + copies * rows * kv_bytes + logp
            for rows, tokens, logp in microbatches
        ),
        default=0,
    )
