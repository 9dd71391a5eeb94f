"""The reuse step under PyTorch's own data parallelism: FSDP2 (``fully_shard``) and DDP.

Each rank runs its own groups; after the step every rank holds the gradients of dense training
on the union of all ranks' groups divided by the world size (the engines' own averaging: pass
``loss * world_size`` for the sum, or scale the gradients).

Neither engine sees the reuse schedule as it expects: the adapter calls the decoder body and the
LM head directly (the root's forward, where DDP arms its reducer and FSDP2 unshards the root,
may never run), phase C injects gradients at the prompt K/V inside each sharded unit (FSDP2's
pre-backward hooks sit on unit outputs), and ranks run different numbers of microbatches while
FSDP2's all-gathers and every reduction are collectives all ranks must join. So hbmplan drives
both engines explicitly, the way ``torch.distributed.pipelining`` runs many backwards and
reduces once:

* FSDP2 (:class:`FSDP2Sync`): at the step's start every unit (the root and each decoder layer)
  is unsharded once, in module order, and stays unsharded through phases A, B and C (no
  reshard after forward or backward); FSDP2's hooks then find everything gathered and issue no
  collective, whatever each rank's number of microbatches. Gradient reduction is off during the
  backwards; after the vote, ``grad_sync="phase-c"`` reduce-scatters once per unit,
  ``"every-microbatch"`` reduce-scatters after every backward (phase B's and C's) and pads each
  rank to the ranks' largest count with reduce-scatters of zeros. Then every unit is resharded.
  Collectives per step: one all-gather per unit, one reduce-scatter per unit (per backward for
  "every-microbatch"), one vote.
* DDP (:class:`DDPSync`): the reducer is never armed (DDP's forward never runs); after the step
  the gradients are averaged with all-reduces in buckets of DDP's ``bucket_cap``, every
  parameter that requires grad exactly once (also those phase C never reaches: the LM head and
  final norm), those without a gradient on any rank left ``None``.

Atomic across ranks: at the step's end every rank votes (:func:`hbmplan.distributed.agreement.vote`);
if any rank failed, no rank reduces, every rank drops the step's gradients (FSDP2's unsharded
ones here, ``.grad`` in :class:`hbmplan.atomic.GradStash`) and raises, naming the failing ranks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from hbmplan.config import GradSync
from hbmplan.distributed.agreement import collective_device, vote
from hbmplan.errors import DataParallelError, RankFailureError

__all__ = [
    "DDPSync",
    "DataParallelStats",
    "FSDP2Sync",
    "all_ranks",
    "data_parallel",
    "sum_router_counts",
    "unwrap",
]


@dataclass
class DataParallelStats:
    """One rank's data-parallel figures for one step (bytes computed from parameter sizes, not
    measured on the wire)."""

    engine: Literal["fsdp2", "ddp"]
    world_size: int
    rank: int
    grad_sync: str
    synced: bool
    all_gathers: int = 0
    all_gather_bytes: int = 0
    """Unsharded bytes the all-gathers produce (each rank receives (W-1)/W of them)."""
    reductions: int = 0
    """Reduce-scatters (FSDP2, one per unit each time) or all-reduce buckets (DDP)."""
    reduce_bytes: int = 0
    """Unsharded gradient bytes entering the reduce-scatters or all-reduces."""
    unsharded_param_bytes: int = 0
    """Parameter bytes held unsharded through the step (FSDP2)."""
    slowest_seconds: float = 0.0
    """All ranks: the slowest rank's step time."""
    largest_peak_bytes: int = 0
    """All ranks: the largest phase peak of any rank."""
    most_reduce_bytes: int = 0
    """All ranks: the most gradient bytes any rank reduced."""

    def __str__(self) -> str:
        mib = 2**20
        sync = f"grad_sync={self.grad_sync}" if self.synced else "sync=False (not reduced)"
        return (
            f"data parallel: {self.engine}, rank {self.rank} of {self.world_size}, {sync}: "
            f"{self.all_gathers} all-gathers {self.all_gather_bytes / mib:.1f} MiB, "
            f"{self.reductions} reductions {self.reduce_bytes / mib:.1f} MiB (from parameter "
            f"sizes), unsharded parameters held {self.unsharded_param_bytes / mib:.1f} MiB\n"
            f"all ranks: slowest step {self.slowest_seconds * 1e3:.1f} ms, largest peak "
            f"{self.largest_peak_bytes / mib:.1f} MiB, most reduced {self.most_reduce_bytes / mib:.1f} MiB"
        )


def all_ranks(stats: DataParallelStats, seconds: float, peak: int, group=None) -> None:
    """Fill ``stats``' all-rank figures: one all-reduce (max) over every rank."""
    t = torch.tensor(
        [seconds, float(peak), float(stats.reduce_bytes)],
        dtype=torch.float64,
        device=collective_device(group),
    )
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    stats.slowest_seconds = float(t[0])
    stats.largest_peak_bytes, stats.most_reduce_bytes = int(t[1]), int(t[2])


def unwrap(model: nn.Module) -> nn.Module:
    """The module a DDP wrapper holds; any other model as it is."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def data_parallel(model: nn.Module, grad_sync: GradSync = "phase-c") -> FSDP2Sync | DDPSync | None:
    """The data-parallel driver for ``model``: :class:`DDPSync` for a
    ``DistributedDataParallel`` model, :class:`FSDP2Sync` for a model whose root and decoder
    layers were wrapped with ``fully_shard``, ``None`` for a plain model.

    Raises:
        DataParallelError: FSDP2 units inside the model but not at its root, a grouped unit
            (``fully_shard([a, b])``), or ``grad_sync="every-microbatch"`` under DDP.
    """
    from torch.nn.parallel import DistributedDataParallel

    if grad_sync not in ("phase-c", "every-microbatch"):
        raise ValueError(f"grad_sync must be 'phase-c' or 'every-microbatch', got {grad_sync!r}")
    if isinstance(model, DistributedDataParallel):
        if grad_sync != "phase-c":
            raise DataParallelError(
                "grad_sync='every-microbatch' is for FSDP2 (it keeps only sharded gradients); "
                "DDP holds full gradients anyway and reduces once per step ('phase-c')"
            )
        return DDPSync(model)
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        return None
    if not isinstance(model, FSDPModule):
        raise DataParallelError(
            "an FSDP2 model must have its root wrapped too: fully_shard(layer) for each decoder "
            "layer, then fully_shard(model)"
        )
    return FSDP2Sync(model, grad_sync)


def _state(module: nn.Module) -> Any:
    return module._get_fsdp_state()  # type: ignore[attr-defined]


def _groups(module: nn.Module) -> list[Any]:
    return list(_state(module)._fsdp_param_groups)


_SETTINGS = (
    "post_forward_mesh_info",
    "reduce_grads",
    "all_reduce_grads",
    "reshard_after_backward",
    "reduce_scatter_unused_params",
)


class FSDP2Sync:
    """Drives FSDP2 through one reuse step (see the module docstring).

    Call order per step, on every rank: :meth:`begin`, then :meth:`after_backward` after each
    backward, then :meth:`end` (also after a failure: it votes). ``sync=False`` accumulates the
    unsharded gradients inside FSDP2 without reducing; the next ``sync=True`` step reduces them
    with its own.
    """

    engine = "fsdp2"

    def __init__(self, root: nn.Module, grad_sync: GradSync = "phase-c") -> None:
        from torch.distributed.fsdp import FSDPModule

        self.root = root
        self.grad_sync = grad_sync
        self.units = [m for m in root.modules() if isinstance(m, FSDPModule)]
        for unit in self.units:
            if len(_state(unit)._modules) > 1:
                raise DataParallelError(
                    "a grouped fully_shard unit (fully_shard([a, b])) is not supported yet "
                    "(pytorch #183702): wrap each decoder layer and the root on their own"
                )
        self.group = None  # votes on the default process group
        self._saved: list[dict[str, Any]] = []
        self._stash: list[tuple[Any, torch.Tensor | None, torch.Tensor | None]] = []
        self._pending = False  # a sync=False step left unsharded gradients to reduce
        self._target = 0
        self._done = 0
        self._native = False
        self._active = False
        self.stats: DataParallelStats | None = None

    @property
    def _param_groups(self) -> list[Any]:
        return [g for unit in self.units for g in _groups(unit)]

    def begin(self, planned_backwards: int, sync: bool) -> None:
        """Unshard every unit for the step and turn FSDP2's own resharding and reduction off.
        ``planned_backwards``: this rank's backwards (phase-B microbatches with work, plus one
        phase C per group), for ``"every-microbatch"``'s common count."""
        root_state = _state(self.root)
        root_state._lazy_init()  # the root may never run forward (Hugging Face adapters)
        self.sync, self._active = sync, True
        self._saved = [{k: getattr(g, k) for k in _SETTINGS} for g in self._param_groups]
        self._last_backward = root_state._state_ctx.is_last_backward
        for g in self._param_groups:
            g.post_forward_mesh_info = None
            g.reduce_grads = g.all_reduce_grads = g.reshard_after_backward = False
            g.reduce_scatter_unused_params = True  # every rank reduces the same tensors
        root_state._state_ctx.is_last_backward = False
        self._stash = []
        for g in self._param_groups:
            for p in g.fsdp_params:
                unsharded = getattr(p, "_unsharded_param", None)
                grad = unsharded.grad if unsharded is not None else None
                self._stash.append((p, grad, p.unsharded_accumulated_grad))
                if unsharded is not None:
                    unsharded.grad = None
                p.unsharded_accumulated_grad = None
        world = dist.get_world_size(self.group)
        self.stats = DataParallelStats(
            "fsdp2", world, dist.get_rank(self.group), self.grad_sync, sync
        )
        self._done = 0
        self._target = 0
        if sync and self.grad_sync == "every-microbatch":
            count = torch.tensor([planned_backwards], device=collective_device(self.group))
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.group)
            self._target = int(count.item())
        self._native = bool(self._target)
        root_state._state_ctx.is_last_backward = self._native  # autograd's callbacks then wait
        if self._native:  # FSDP2's hooks reduce-scatter each unit as its backward finishes
            for g in self._param_groups:
                g.reduce_grads = g.all_reduce_grads = True
        for unit in self.units:  # the same order on every rank
            unit.unshard()
        gathered = sum(_unsharded_bytes(g) for g in self._param_groups)
        self.stats.all_gathers = len(self._param_groups)
        self.stats.all_gather_bytes = self.stats.unsharded_param_bytes = gathered

    def after_backward(self) -> None:
        """After a backward: FSDP2's end-of-backward bookkeeping (the root's callback, when
        autograd did not run it: the root's forward never ran), and for ``"every-microbatch"``
        the wait on that backward's reduce-scatters (FSDP2's hooks issued them per unit as each
        unit's backward finished)."""
        every = self.sync and self.grad_sync == "every-microbatch"
        if every:
            for g in self._param_groups:
                self.stats.reduce_bytes += _unsharded_bytes(g, reduce=True)
                self.stats.reductions += 1
        self._finish_backward(wait=every)
        if every:
            self._done += 1

    def _finish_backward(self, wait: bool) -> None:
        """Run the root's end-of-backward callback unless autograd already did (it does when
        the root's forward ran: its output hooks queue it); ``wait``: as the last backward, so
        that it waits on the reduce-scatters."""
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

        if all(g._training_state == TrainingState.IDLE for g in self._param_groups):
            return
        ctx = _state(self.root)._state_ctx
        ctx.is_last_backward = wait
        try:
            _state(self.root)._root_post_backward_final_callback()
        finally:
            ctx.is_last_backward = self._native

    def _reduce(self) -> None:
        """Reduce-scatter every unit's unsharded gradients into the sharded ``.grad`` (zeros
        for a parameter without one, so every rank reduces the same tensors)."""
        groups = self._param_groups
        root_state = _state(self.root)
        for g in reversed(groups):
            g.reduce_grads = g.all_reduce_grads = True
            self.stats.reduce_bytes += _unsharded_bytes(g, reduce=True)
            self.stats.reductions += 1
            g.post_backward()
        root_state._state_ctx.is_last_backward = True
        try:
            root_state._root_post_backward_final_callback()  # waits on the reductions
        finally:
            root_state._state_ctx.is_last_backward = self._native
            for g in groups:
                g.reduce_grads = g.all_reduce_grads = self._native
        self._done += 1

    def _drop_fresh(self) -> None:
        for p, _, _ in self._stash:
            unsharded = getattr(p, "_unsharded_param", None)
            if unsharded is not None:
                unsharded.grad = None
            p.unsharded_accumulated_grad = None

    def _merge_stash(self) -> None:
        """Add the unsharded gradients of earlier ``sync=False`` steps back."""
        for p, grad, acc in self._stash:
            unsharded = getattr(p, "_unsharded_param", None)
            if grad is not None and unsharded is not None:
                unsharded.grad = grad if unsharded.grad is None else grad.add_(unsharded.grad)
            if acc is not None:
                fresh = p.unsharded_accumulated_grad
                p.unsharded_accumulated_grad = acc if fresh is None else acc.add_(fresh)
        self._stash = []

    def _restore_stash(self) -> None:
        self._drop_fresh()
        for p, grad, acc in self._stash:
            unsharded = getattr(p, "_unsharded_param", None)
            if unsharded is not None:
                unsharded.grad = grad
            p.unsharded_accumulated_grad = acc
        self._stash = []

    def end(self, ok: bool, error: BaseException | None) -> None:
        """Vote; then reduce (if ``sync``) and reshard, or drop the step's gradients, reshard
        and raise :class:`RankFailureError` on a rank that succeeded while another failed."""
        if not self._active:
            return
        self._active = False
        root_state = _state(self.root)
        self._native = False
        root_state._state_ctx.is_last_backward = False
        for g in self._param_groups:
            g.reduce_grads = g.all_reduce_grads = False
        try:
            with contextlib.suppress(Exception):  # a failed backward left hooks mid-flight
                self._finish_backward(wait=False)
            if self.sync and self.grad_sync == "every-microbatch" and self._done < self._target:
                if not ok:
                    self._drop_fresh()  # keep the collective sequence with zeros
                while self._done < self._target:
                    self._reduce()
            self._target = 0
            failed = vote(ok, error, self.group)
            if failed:
                self._restore_stash()
            else:
                self._merge_stash()
                if self.sync and (self.grad_sync == "phase-c" or self._pending):
                    self._reduce()
                self._pending = not self.sync
        finally:
            for unit in self.units:
                unit.reshard()
            for g, saved in zip(self._param_groups, self._saved, strict=True):
                for k, v in saved.items():
                    setattr(g, k, v)
            root_state._state_ctx.is_last_backward = self._last_backward
        if failed and ok:
            raise RankFailureError(failed)
        if failed and error is not None and hasattr(error, "add_note"):
            error.add_note(f"hbmplan: {RankFailureError(failed)}")

    def after_merge(self, sync: bool) -> None:
        """Nothing: FSDP2 reduced inside :meth:`end`."""


def sum_router_counts(
    counts: torch.Tensor | None, tokens: int, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor | None, int]:
    """A mixture-of-experts step's global-batch counts int64 [L, E] and tokens, summed over
    every rank: "global-batch" then means all ranks' tokens. A rank without groups passes
    ``None`` and 0 (and gets ``None`` back). Two all-reduces: the size, then the sums."""
    device = collective_device(group)
    size = torch.tensor([0 if counts is None else counts.numel()], device=device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX, group=group)
    flat = torch.zeros(int(size.item()) + 1, dtype=torch.int64, device=device)
    if counts is not None:
        flat[:-1] = counts.reshape(-1).to(device=device, dtype=torch.int64)
    flat[-1] = tokens
    dist.all_reduce(flat, group=group)
    if counts is None:
        return None, int(flat[-1])
    return flat[:-1].view(counts.shape).to(counts.device), int(flat[-1])


def _unsharded_bytes(group: Any, reduce: bool = False) -> int:
    """Bytes of a parameter group's unsharded parameters (in the all-gather dtype) or gradients
    (in the reduce dtype)."""
    total = 0
    for p in group.fsdp_params:
        dtype = p.param_dtype or p.orig_dtype
        if reduce:
            dtype = p.reduce_dtype or dtype
        if reduce and not p.sharded_param.requires_grad:
            continue
        total += p._orig_size.numel() * torch.empty((), dtype=dtype).element_size()
    return total


class DDPSync:
    """Drives DDP through one reuse step (see the module docstring): the step runs on the
    wrapped module without arming DDP's reducer; after the step's ``.grad`` merge,
    :meth:`after_merge` averages the gradients across ranks once."""

    engine = "ddp"
    grad_sync = "phase-c"

    def __init__(self, ddp: nn.Module) -> None:
        self.ddp = ddp
        self.module = ddp.module
        self.group = ddp.process_group
        ignored = set(getattr(ddp, "parameters_to_ignore", ()) or ())
        self.params = [
            p for n, p in self.module.named_parameters() if p.requires_grad and n not in ignored
        ]
        self.bucket_bytes = int(getattr(ddp, "bucket_bytes_cap", 25 * 2**20))
        self.stats: DataParallelStats | None = None
        self._active = False

    def begin(self, planned_backwards: int, sync: bool) -> None:
        self.sync, self._active = sync, True
        self.stats = DataParallelStats(
            "ddp", dist.get_world_size(self.group), dist.get_rank(self.group), "phase-c", sync
        )

    def after_backward(self) -> None:
        return None

    def end(self, ok: bool, error: BaseException | None) -> None:
        """Vote; raise :class:`RankFailureError` on a rank that succeeded while another
        failed (its gradients are then restored by the caller's stash)."""
        if not self._active:
            return
        self._active = False
        failed = vote(ok, error, self.group)
        if failed and ok:
            raise RankFailureError(failed)
        if failed and error is not None and hasattr(error, "add_note"):
            error.add_note(f"hbmplan: {RankFailureError(failed)}")

    def after_merge(self, sync: bool) -> None:
        """Average every trainable parameter's ``.grad`` across ranks (a parameter with a
        gradient on some rank gets zeros on the others first; one without on every rank stays
        ``None``)."""
        if not sync:
            return
        world = dist.get_world_size(self.group)
        device = collective_device(self.group)
        have = torch.tensor([p.grad is not None for p in self.params], dtype=torch.int32)
        have = have.to(device)
        dist.all_reduce(have, group=self.group)
        present = [p for p, h in zip(self.params, have.tolist(), strict=True) if h]
        for p in present:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets(present, self.bucket_bytes):
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            dist.all_reduce(flat, group=self.group)
            flat.div_(world)
            offset = 0
            for p in bucket:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n
            if self.stats is not None:
                self.stats.reductions += 1
                self.stats.reduce_bytes += flat.nbytes


def _buckets(params: list[nn.Parameter], cap: int) -> list[list[nn.Parameter]]:
    """Consecutive parameters of one gradient dtype and device, each bucket within ``cap``
    bytes (a larger parameter alone)."""
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        g = p.grad
        nbytes = g.numel() * g.element_size()
        last = buckets[-1] if buckets else None
        same = last is not None and (last[0].grad.dtype, last[0].grad.device) == (
            g.dtype,
            g.device,
        )
        if last is None or not same or size + nbytes > cap:
            buckets.append([p])
            size = nbytes
        else:
            last.append(p)
            size += nbytes
    return buckets
