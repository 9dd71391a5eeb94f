"""The ranks' vote at the end of a data-parallel step: did every rank succeed?

Each rank contributes a flag (and, when it failed, its error as text); every rank learns the
same answer, so every rank takes the same path afterwards (reduce, or restore and raise). Every
wait is one collective of the process group, bounded by the group's timeout: a rank that died
makes the others raise within it (the group must then be re-created).

    failed = vote(ok, error, group)   # {} when every rank succeeded, else {rank: "Type: msg"}
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["collective_device", "describe", "vote"]


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device a small tensor for ``group``'s collectives lives on (CUDA for NCCL, else CPU)."""
    backend = dist.get_backend(group)
    if "nccl" in str(backend).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def describe(error: BaseException | None) -> str:
    """``"Type: message"`` of ``error`` (at most 500 characters)."""
    if error is None:
        return "failed without an exception"
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 500 else text[:497] + "..."


def vote(
    ok: bool, error: BaseException | None = None, group: dist.ProcessGroup | None = None
) -> dict[int, str]:
    """Every rank of ``group`` calls this at the same point of the step; returns the failing
    ranks' errors, ``{}`` when all succeeded (the same answer on every rank).

    One all-reduce of a ``[world_size]`` int32 flag tensor; only when some rank failed, one
    ``all_gather_object`` of the error texts. Ranks are ``group``'s ranks."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    flags = torch.zeros(world, dtype=torch.int32, device=collective_device(group))
    if not ok:
        flags[rank] = 1
    dist.all_reduce(flags, group=group)
    failed = [r for r, f in enumerate(flags.tolist()) if f]
    if not failed:
        return {}
    texts: list[str | None] = [None] * world
    dist.all_gather_object(texts, None if ok else describe(error), group=group)
    return {r: texts[r] or "failed" for r in failed}
