"""Context parallel (CP) for the reuse step: a prompt split across ranks.

Every CP rank calls the step with the same groups. Per group:

* A: rank r runs the prompt forward over its slice of ``p[:-1]`` (:class:`PromptSplit`,
  zig-zag by default), attending causally to every slice
  (:class:`~hbmplan.distributed.cp_attention.SplitPromptAttention`); it keeps its slice's K/V
  and activations only, so the prompt's activation memory divides by CP.
* B: the group's packed microbatches are dealt in rounds, one microbatch per rank per round
  (the longest first, so a round's microbatches are alike); a rank with none in the last round
  runs a one-token row with zero loss, because every rank takes part in every collective. A
  microbatch's queries reach the other slices by pass-Q or by all-gathering K/V, whichever
  moves fewer bytes (``cp_exchange``); gK/gV stay with the slice's owner.
* C: each rank's prompt backward from its gradient cache; the attention's backward exchanges
  the cross-rank dK/dV.

Then each parameter's gradient is summed over the CP ranks (not averaged): every rank ends
with the full gradient, exactly what one rank running the whole step would hold. Not yet:
offload, mixture-of-experts router losses, participants (NVTX, metering, offload), token
filtering, and skipping inert responses (every response runs: same gradients, no saving).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from hbmplan.config import ReuseConfig
from hbmplan.distributed.cp_attention import (
    CPComm,
    PromptSplit,
    SplitPromptAttention,
    SplitPromptResponses,
    choose_exchange,
    slice_inputs,
)
from hbmplan.errors import ParallelLayoutError
from hbmplan.group import Group, validate_groups
from hbmplan.models.adapter import CausalLMAdapter, adapt, model_device
from hbmplan.models.packed import cu_seqlens_for
from hbmplan.runtime.capture import SavedTensorCapture
from hbmplan.runtime.stats import PhaseClock, StepStats
from hbmplan.runtime.step_plan import GroupPlan, Microbatch
from hbmplan.schedules.grad_cache import GradientCache
from hbmplan.schedules.microbatch import LossFn, microbatch_loss, packed_rows, token_logprobs
from hbmplan.schedules.phases import prompt_needs_graph
from hbmplan.schedules.step_plan import plan_step

__all__ = ["CPComm", "PromptSplit", "cp_group", "cp_rounds", "cp_step"]


def cp_group(mesh) -> dist.ProcessGroup:
    """The process group of a 1-D ``DeviceMesh`` or a ``ProcessGroup`` itself."""
    return mesh if isinstance(mesh, dist.ProcessGroup) else mesh.get_group()


def cp_rounds(microbatches: Sequence[Microbatch], cp: int) -> list[list[Microbatch | None]]:
    """Phase B's rounds: ``cp`` microbatches each, longest first, ``None`` where a rank has none
    (only in the last round). Rank r runs ``round[r]``."""
    order = sorted((mb for mb in microbatches if mb.indices), key=lambda mb: -mb.tokens)
    rounds = [order[i : i + cp] for i in range(0, len(order), cp)]
    return [r + [None] * (cp - len(r)) for r in rounds]


def _check(adapter: CausalLMAdapter, config: ReuseConfig) -> None:
    if adapter.is_moe:
        raise ParallelLayoutError(
            f"context parallel runs dense models, got the mixture-of-experts "
            f"{type(adapter.model).__name__} (the router loss's prompt counts are not split)"
        )
    if config.cp_mesh is None:
        raise ValueError("cp_step needs a config with cp_mesh set")
    if config.token_filter is not None:
        raise ValueError("token_filter does not run under context parallel yet: give None")


def _heads(adapter: CausalLMAdapter, kv: torch.Tensor) -> tuple[int, int, int]:
    """(Hq, Hkv, D) as this rank holds them (local heads under tensor parallel)."""
    model = adapter.model
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        hq, hkv = cfg.num_heads, cfg.num_kv_heads
    else:
        c = adapter.config
        hq, hkv = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    local = kv.shape[1]
    return hq * local // hkv, local, kv.shape[-1]


def cp_step(
    model: nn.Module | CausalLMAdapter,
    groups: Sequence[Group],
    loss_fn: LossFn,
    config: ReuseConfig,
    comm: CPComm | None = None,
) -> StepStats:
    """One reuse step with each prompt split over ``config.cp_mesh``; ``.grad`` accumulates
    the full (CP-summed) gradient on every rank. ``comm`` (optional) keeps the byte counts
    across steps. Raises before any gradient changes on a layout it cannot run; a failure later
    restores ``.grad`` on this rank (the other ranks fail in their collectives' timeout)."""
    adapter = adapt(model)
    _check(adapter, config)
    comm = comm or CPComm(cp_group(config.cp_mesh))
    device = model_device(adapter)
    validate_groups(groups, adapter.vocab_size, adapter.max_positions, device)
    adapter.check_schedulable()
    plan = plan_step(adapter, groups, config.replace(attention="reference"))
    trajectories = sum(len(mb.indices) for g in plan.groups for mb in g.microbatches)
    stats = StepStats("reuse", groups=len(plan.groups), trajectories=trajectories)
    stats.attention = f"context parallel x{comm.size} ({config.cp_exchange})"
    clock = PhaseClock(stats, device)
    params = [p for p in adapter.model.parameters() if p.requires_grad]
    before = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        total = torch.zeros((), device=device, dtype=torch.float64)
        graph = prompt_needs_graph(adapter)
        for gp in plan.groups:
            total = total + _group(adapter, gp, loss_fn, config, comm, clock, graph)
        _sum_gradients(params, comm)
        dist.all_reduce(total, group=comm.group)
    except BaseException:
        for p, g in zip(params, before, strict=True):
            p.grad = g
        raise
    for p, g in zip(params, before, strict=True):
        if g is not None:
            p.grad = g.add_(p.grad) if p.grad is not None else g
    stats.loss = total
    return clock.finish()


def _sum_gradients(params: Sequence[nn.Parameter], comm: CPComm) -> None:
    """Sum every gradient over the CP ranks (a DTensor's local shard: the TP layout is the same
    on every CP rank). A rank that never reached a parameter contributes zeros."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = getattr(p.grad, "_local_tensor", p.grad)
        dist.all_reduce(g, group=comm.group)


def _group(adapter, gp: GroupPlan, loss_fn, config, comm, clock, graph) -> torch.Tensor:
    group = gp.group
    n = group.prompt_len - 1
    split = PromptSplit(n, comm.size, config.cp_balance)
    meter = group.prompt.device.type == "cpu"
    capture = SavedTensorCapture(_model_storages(adapter), adapter.layers) if meter else None
    cache = None
    try:
        comm.phase = "A"
        with clock.phase("A"), capture.phase("A") if meter else contextlib.nullcontext():
            attention = SplitPromptAttention(comm, split, adapter.num_layers)
            with torch.enable_grad() if graph else torch.no_grad():
                ids, pos, real = slice_inputs(split, comm.rank, group.prompt[:-1])
                kv = adapter.prompt_kv(ids, pos, attention=attention)
                kv = [(k[:, :, :real], v[:, :, :real]) for k, v in kv]
            cache = GradientCache(kv, config.grad_cache_dtype)
        hot = [t for pair in cache.prompt_kv for t in pair]
        if meter:
            clock.sample("A", capture.peak_nbytes + capture.unrecorded_nbytes(hot))
            held = capture.held_nbytes(hot) + cache.nbytes
        clock.stats.prompt_kv_bytes = max(clock.stats.prompt_kv_bytes, cache.kv_bytes)
        clock.stats.grad_cache_bytes = max(clock.stats.grad_cache_bytes, cache.nbytes)
        comm.phase = "B"
        total = torch.zeros((), device=group.prompt.device, dtype=torch.float64)
        hq, hkv, d = _heads(adapter, kv[0][0])
        with clock.phase("B"):
            for round_ in cp_rounds(gp.microbatches, comm.size):
                tokens = max(mb.tokens if mb is not None else 1 for mb in round_)
                exchange = choose_exchange(
                    config.cp_exchange, comm.size, heads=hq, kv_heads=hkv, head_dim=d,
                    slice_len=split.max_len, tokens=tokens,
                )  # fmt: skip
                loss = _microbatch(adapter, gp, round_[comm.rank], cache, split, comm, tokens,
                                   exchange, loss_fn, config)  # fmt: skip
                total = total + loss.to(total.dtype)
                clock.stats.microbatches += round_[comm.rank] is not None
            if meter:
                clock.sample("B", held)
        comm.phase = "C"
        with clock.phase("C"):
            if meter:
                clock.sample("C", held)
            cache.backward()
        return total
    finally:
        if cache is not None:
            cache.release()
        if capture is not None:
            capture.release()


def _microbatch(adapter, gp, mb, cache, split, comm, tokens, exchange, loss_fn, config):
    """This rank's microbatch of a round (or a zero-loss one-token row), forward and backward;
    returns the loss, detached."""
    group = gp.group
    if mb is None:
        ids, pos = group.prompt[-1:][None], torch.full_like(group.prompt[-1:], split.n)[None]
        lengths: list[int] = [1]
    else:
        targets = [group.responses[i] for i in mb.indices]
        seqs = [torch.cat([group.prompt[-1:], t[:-1]]) for t in targets]
        lengths = [t.numel() for t in targets]
        ids, pos = packed_rows(seqs, split.n)
    prefix = SplitPromptResponses(
        comm, cache.views(), split, cu_seqlens_for(lengths, "cpu"), tokens, exchange
    )
    hidden = adapter.response_hidden(ids, pos, prefix)
    if mb is None:  # every rank joins every collective, forward and backward
        loss = hidden.sum() * 0
        loss.backward()
        return loss.detach()
    logprobs = token_logprobs(adapter, hidden[0], targets)
    loss = microbatch_loss(loss_fn, logprobs, group, mb.indices, config.check_finite)
    loss.backward()
    return loss.detach()


def _model_storages(adapter) -> list[torch.Tensor]:
    model = adapter.model
    return [getattr(t, "_local_tensor", t) for t in (*model.parameters(), *model.buffers())]
