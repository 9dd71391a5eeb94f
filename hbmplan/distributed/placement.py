"""Place whole groups on ranks so that each rank's step costs about the same.

    placement = hbmplan.distributed.assign(groups, world_size, model)
    mine = [groups[i] for i in placement.ranks[rank]]
    print(placement)          # per-rank FLOPs and peak bytes, the imbalance

A group (a prompt and all its responses) never spans ranks. The cost of a group is its reuse
step's training FLOPs (:func:`hbmplan.capacity.flops.reuse_flops`, as executed); without a
model, its tokens (prompt + responses). Placement is greedy longest-first (each group, most
expensive first, to the least loaded rank; ties to the lower index), so it is deterministic and
the most loaded rank exceeds the mean by at most the most expensive group (Graham's bound: at
most 4/3 of the optimum). Each rank's predicted peak (the byte model's
:func:`hbmplan.capacity.step_bytes.estimate_step`, the largest of its groups: groups run one
after another) is reported beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hbmplan.capacity.flops import reuse_flops
from hbmplan.capacity.presets import model_spec
from hbmplan.capacity.step_bytes import estimate_step
from hbmplan.group import Group

__all__ = ["Placement", "assign"]


@dataclass(frozen=True)
class Placement:
    """Which groups each rank trains, and what that costs."""

    ranks: tuple[tuple[int, ...], ...]
    """Per rank, the indices into ``groups`` it trains, ascending."""
    costs: tuple[int, ...]
    """Per rank, its estimated step cost (training FLOPs, or tokens without a model)."""
    unit: str
    """"FLOPs" or "tokens"."""
    peak_bytes: tuple[int, ...] | None = None
    """Per rank, the byte model's peak of its largest group (``None`` without a model)."""

    @property
    def imbalance(self) -> float:
        """Most loaded rank's cost / mean cost (1.0: perfectly balanced)."""
        mean = sum(self.costs) / len(self.costs)
        return max(self.costs) / mean if mean else 1.0

    def __str__(self) -> str:
        lines = [f"placement over {len(self.ranks)} ranks, imbalance {self.imbalance:.3f}"]
        for r, (idx, cost) in enumerate(zip(self.ranks, self.costs, strict=True)):
            peak = "" if self.peak_bytes is None else f", peak {self.peak_bytes[r] / 2**20:.1f} MiB"
            lines.append(f"  rank {r}: {len(idx)} group(s), {cost:.3e} {self.unit}{peak}")
        return "\n".join(lines)


def _lens(g: Group | tuple[int, Sequence[int]]) -> tuple[int, list[int]]:
    if isinstance(g, Group):
        return g.prompt_len, list(g.response_lens)
    prompt_len, lens = g
    return int(prompt_len), [int(n) for n in lens]


def assign(
    groups: Sequence[Group | tuple[int, Sequence[int]]],
    world_size: int,
    model: Any = None,
    *,
    dtype: str = "bfloat16",
    tokens_per_microbatch: int | None = None,
) -> Placement:
    """Place each group on one of ``world_size`` ranks, balancing estimated step cost.

    Args:
        groups: :class:`hbmplan.Group` objects, or ``(prompt_len, response_lens)`` pairs.
        world_size: ranks, >= 1. A rank may get no group (fewer groups than ranks): under data
            parallelism it then calls ``mem.step([])`` and joins the reduction with no work.
        model: anything :func:`hbmplan.capacity.presets.model_spec` reads (a model, a config, a
            preset name): costs in FLOPs and peaks from the byte model; ``None``: costs in tokens.
        dtype, tokens_per_microbatch: for the byte model's peaks.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    shapes = [_lens(g) for g in groups]
    spec = model_spec(model) if model is not None else None
    if spec is not None:
        costs = [reuse_flops(spec, p, lens, executed=True) for p, lens in shapes]
    else:
        costs = [p + sum(lens) for p, lens in shapes]
    order = sorted(range(len(shapes)), key=lambda i: (-costs[i], i))
    loads = [0] * world_size
    placed: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        r = min(range(world_size), key=lambda k: (loads[k], k))
        placed[r].append(i)
        loads[r] += costs[i]
    peaks = None
    if spec is not None:
        group_peak = [
            max(
                b.total
                for b in estimate_step(
                    spec, p, lens, "reuse", dtype, tokens_per_microbatch=tokens_per_microbatch
                ).values()
            )
            for p, lens in shapes
        ]
        peaks = tuple(max((group_peak[i] for i in idx), default=0) for idx in placed)
    return Placement(
        ranks=tuple(tuple(sorted(idx)) for idx in placed),
        costs=tuple(loads),
        unit="FLOPs" if spec is not None else "tokens",
        peak_bytes=peaks,
    )
