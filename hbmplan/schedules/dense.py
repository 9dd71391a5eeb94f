"""The baseline a standard trainer runs: every trajectory ``[prompt; response]`` is its own row,
the prompt recomputed G times. Log-probs on response positions only; same loss contract as the
reuse schedule, so the two are directly comparable. A MoE model's router loss is added per
trajectory (or for the global batch) as :mod:`hbmplan.schedules.router` defines it."""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable, Sequence

import torch
from torch import nn

from hbmplan.config import RouterLossMode, check_tokens_per_microbatch
from hbmplan.group import Group, validate_groups
from hbmplan.models.adapter import CausalLMAdapter, adapt, model_device
from hbmplan.runtime.capture import SavedTensorCapture
from hbmplan.runtime.nvtx import nvtx_range
from hbmplan.runtime.stats import PhaseClock, StepStats
from hbmplan.schedules.filtering import check_filter, start_filter
from hbmplan.schedules.microbatch import (
    LossFn,
    microbatch_loss,
    pack_rows,
    padded_rows,
    response_logprobs,
)
from hbmplan.schedules.router import RouterLoss, count_dense, resolve_router_loss, routing_sums
from hbmplan.schedules.skipping import declared_extents, skip_stats
from hbmplan.token_filter import TokenFilter

__all__ = ["dense_step"]


def dense_step(
    model: nn.Module | CausalLMAdapter,
    groups: Sequence[Group],
    loss_fn: LossFn,
    tokens_per_microbatch: int | None = None,
    *,
    check_finite: bool = False,
    router_loss: RouterLossMode = "per-trajectory",
    after_backward: Callable[[], None] | None = None,
    router_counts: Callable[[torch.Tensor, int], tuple[torch.Tensor, int]] | None = None,
    skip_inert: bool = True,
    check_skips: bool = False,
    token_filter: TokenFilter | None = None,
) -> StepStats:
    """One step of the dense trainer; gradients accumulate into ``.grad``.

    Each trajectory ``[p; r_i[:-1]]`` (length P + S_i - 1, positions from 0) is a row; with
    ``tokens_per_microbatch`` rows of a group are packed while rows x longest row stays within
    the budget, otherwise each row is its own microbatch. The log-prob of ``r_i[t]`` is read at
    row index ``P - 1 + t``.

    For a MoE model whose router loss is on, ``router_loss="per-trajectory"`` adds each
    trajectory's ``coef * aux`` computed over its own tokens (padding excluded: the loss of the
    trajectory as its own forward), "global-batch" one loss over all tokens of the step (after a
    counting pass over the same microbatches), "off" nothing.

    ``after_backward`` is called after each microbatch's backward, ``router_counts(counts,
    tokens)`` may revise the global-batch counts after the counting pass (a data-parallel
    driver: see :func:`hbmplan.distributed.dense_step`).

    ``skip_inert`` and ``check_skips`` as on :class:`hbmplan.ReuseConfig`: inert responses and
    masked tails the loss declares are not run (:mod:`hbmplan.schedules.skipping`).
    ``token_filter`` as on :class:`hbmplan.ReuseConfig` (:mod:`hbmplan.schedules.filtering`):
    the prompt positions ``0..P-2`` of every row are never dropped.
    """
    adapter = adapt(model)
    check_tokens_per_microbatch(tokens_per_microbatch)
    spec = resolve_router_loss(router_loss, adapter.router)
    check_filter(token_filter, spec)
    validate_groups(groups, adapter.vocab_size, adapter.max_positions, model_device(adapter))
    device = groups[0].prompt.device
    stats = StepStats("dense", groups=len(groups), trajectories=sum(g.group_size for g in groups))
    extents = None
    if spec is None and (skip_inert or check_skips):
        extents = declared_extents(loss_fn, groups)
    skipping = extents is not None and skip_inert and not check_skips
    if skipping:  # counted as the reuse schedule counts them: what trains
        stats.skipped = skip_stats(groups, extents)
        stats.groups -= stats.skipped.groups
        stats.trajectories -= stats.skipped.responses
    clock = PhaseClock(stats, device)
    exclude = [*adapter.model.parameters(), *adapter.model.buffers()]
    total = torch.zeros((), device=device)
    router = RouterLoss(spec, router_loss) if spec is not None else None
    logits: list[torch.Tensor] = []
    routed = {} if router is None else {"router_logits": logits}
    try:
        if router is not None and router.mode == "global-batch":
            with clock.phase("count"):
                counts = count_dense(adapter, spec, groups, tokens_per_microbatch)
                router.set_global(*(router_counts or (lambda *c: c))(*counts))
        with clock.phase("dense"), nvtx_range("hbmplan.dense.dense"):
            for g, group in enumerate(groups):
                P = group.prompt_len
                run = extents[g] if skipping else group.response_lens
                declared = extents[g] if check_skips and extents is not None else ()
                order = [i for i in range(group.group_size) if run[i] > 0]
                lengths = [P + run[i] - 1 for i in order]
                for positions in pack_rows(lengths, tokens_per_microbatch):
                    indices = [order[j] for j in positions]
                    targets = [group.responses[i][: run[i]] for i in indices]
                    rows = [torch.cat([group.prompt, t[:-1]]) for t in targets]
                    ids, pos = padded_rows(rows, 0)
                    B, T = ids.shape
                    filt = start_filter(
                        token_filter, group, indices, [t.numel() for t in targets],
                        [b * T + P - 1 for b in range(B)], B * T,
                        always=[(b * T, b * T + P - 1) for b in range(B)],
                    )  # fmt: skip
                    capture = (
                        SavedTensorCapture(exclude, adapter.layers)
                        if device.type != "cuda"
                        else None
                    )
                    try:
                        with capture.phase("dense") if capture else contextlib.nullcontext():
                            with filt.forward() if filt else contextlib.nullcontext():
                                hidden = adapter.full_hidden(ids, pos, **routed)
                            logprobs = response_logprobs(
                                adapter, hidden, [P - 1] * len(indices), targets
                            )
                            if filt is not None:
                                logprobs = filt.finish(adapter, hidden, logprobs)
                                stats.filtered_tokens += filt.dropped
                            loss = microbatch_loss(
                                loss_fn, logprobs, group, indices, check_finite, declared
                            )
                            if router is not None:
                                lens = [lengths[j] for j in positions]
                                loss = loss + router(routing_sums(spec, logits, lens))
                        if capture is not None:
                            clock.sample("dense", capture.peak_nbytes)
                        loss.backward()
                        if after_backward is not None:
                            after_backward()
                    finally:
                        logits.clear()
                        if capture is not None:
                            capture.release()
                    total = total + loss.detach().to(total.dtype)
                    stats.microbatches += 1
        stats.loss = total
        if router is not None:
            stats.router = router.report()
        return clock.finish()
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)
        raise
