"""The shared-prefix reuse schedule: prompt forward once (A), responses as ordinary microbatches
that read the prompt K/V and accumulate gK/gV (B), prompt backward once (C).

For a group with prompt ``p`` (length P) and responses ``r_i`` (lengths S_i):

* A: the model runs ``p[:-1]`` at positions ``0..P-2`` and keeps each layer's post-RoPE K/V in
  the autograd graph.
* B: each microbatch runs rows ``[p[-1]; r_i[:-1]]`` at positions ``P-1..P+S_i-2``, attending to
  the prompt K/V and to their own earlier tokens; the log-probs of ``r_i`` go to the user's loss
  and the microbatch runs backward. Parameter gradients accumulate as usual, gK/gV in the
  gradient cache. Rows are packed end to end for the prefix-attention kernel, or right-padded
  for plain PyTorch attention (see :mod:`hbmplan.schedules.attention`).
* C: one backward of the prompt graph from the gradient cache.

In real arithmetic this equals the dense trainer's gradients: the prompt's forward does not
depend on the responses, and gradients are linear.

For a mixture-of-experts model with a router loss, phase A also computes the prompt's routing
sums once; phase B adds each trajectory's router loss from prompt + row sums, and phase C
back-propagates the prompt sums' accumulated gradient with gK/gV (see
:mod:`hbmplan.schedules.router`).
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable, Sequence

import torch
from torch import nn

from hbmplan.group import Group, validate_groups
from hbmplan.models.adapter import (
    CausalLMAdapter,
    adapt,
    check_schedulable,
    is_moe,
    model_device,
    model_dtype,
    router_spec,
)
from hbmplan.models.packed import cu_seqlens_for
from hbmplan.planner.capture import SavedTensorCapture
from hbmplan.schedules.attention import Attention, PhaseBAttention, resolve_attention
from hbmplan.schedules.grad_cache import GradientCache, accumulation_dtype
from hbmplan.schedules.microbatch import (
    LossFn,
    logprob_working_bytes,
    microbatch_loss,
    pack_rows,
    pack_tokens,
    packed_rows,
    padded_rows,
    response_logprobs,
    token_logprobs,
    unpack_rows,
)
from hbmplan.schedules.offload import (
    PROBE_TOKENS,
    PromptOffloader,
    held_bytes,
    unrecorded_bytes,
)
from hbmplan.schedules.router import (
    PrefixRouterLeaves,
    RouterLoss,
    RouterLossMode,
    count_reuse,
    resolve_router_loss,
    routing_sums,
    with_prefix,
)
from hbmplan.schedules.stats import PhaseClock, StepStats

__all__ = ["check_tokens_per_microbatch", "reuse_step"]


def check_tokens_per_microbatch(tokens_per_microbatch: int | None) -> None:
    """``None`` or a positive int; otherwise a ``TypeError``/``ValueError`` naming the value."""
    if tokens_per_microbatch is None:
        return
    if isinstance(tokens_per_microbatch, bool) or not isinstance(tokens_per_microbatch, int):
        raise TypeError(
            f"tokens_per_microbatch must be an int or None, got "
            f"{type(tokens_per_microbatch).__name__}"
        )
    if tokens_per_microbatch < 1:
        raise ValueError(f"tokens_per_microbatch must be >= 1, got {tokens_per_microbatch}")


_PADDED = PhaseBAttention(None, "")


def _model_storages(adapter: CausalLMAdapter) -> list[torch.Tensor]:
    model: nn.Module = adapter.model
    return [*model.parameters(), *model.buffers()]


def _prompt_needs_graph(adapter: CausalLMAdapter) -> bool:
    """Whether phase A must keep a graph: some parameter that requires grad lies outside the LM
    head (the only part of the model the prompt forward never runs; a head tied to the input
    embedding is reached through it). With everything else frozen no prompt K/V can carry a
    gradient, so phase A runs without a graph, keeps no activations, and phase C has nothing
    to do."""
    model: nn.Module = adapter.model
    head = getattr(adapter, "lm_head", None)
    prefix = next((f"{n}." for n, m in model.named_modules() if m is head), None)
    return any(
        p.requires_grad and not (prefix and name.startswith(prefix))
        for name, p in model.named_parameters(remove_duplicate=False)
    )


def _b_working_estimate(
    per_token: float,
    batches: list[tuple[int, int]],
    kv_bytes: int,
    logits_bytes: Callable[[int], int],
    kv_copies: bool,
) -> int:
    """Phase-B working set for the planner, before phase B has run: the prompt's saved bytes per
    token times the largest microbatch's tokens (``batches``: (rows, tokens) each, padding
    included), its rows' copies of the prompt K/V (twice: the concatenation and its transient;
    none when the kernel reads them in place), and its log-probs' ``logits_bytes(tokens)``."""
    copies = 2 if kv_copies else 0
    return max(
        int(per_token * tokens) + copies * rows * kv_bytes + logits_bytes(tokens)
        for rows, tokens in batches
    )


def _probe(
    adapter: CausalLMAdapter,
    group: Group,
    offloader: PromptOffloader,
    exclude: list[torch.Tensor],
    grad_cache_dtype: torch.dtype | None,
    routed: bool,
) -> None:
    """A forward of the prompt's first :data:`PROBE_TOKENS` tokens, captured and discarded (no
    backward, RNG state restored), so that the first long prompt of a context can plan, and
    stream, before its own phase A."""
    n = PROBE_TOKENS
    device = group.prompt.device
    capture = SavedTensorCapture(exclude, adapter.layers)
    offloader.prepare(capture)
    kwargs = {"router_logits": []} if routed else {}
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), capture.phase("A"):
            # the real phase A reads all but the last of P tokens: the same storage layout
            ids = group.prompt[: n + 1].clone()[None, :-1]
            kvs = adapter.prompt_kv(ids, torch.arange(n, device=device)[None], **kwargs)
        kv_flat = [t for kv in kvs for t in kv]
        kv_bytes = sum(t.nbytes for t in kv_flat)
        cache_dtype = grad_cache_dtype or accumulation_dtype(kv_flat[0].dtype)
        # a K/V without a graph (frozen weights only) has no gradient buffer
        grad_cache_bytes = sum(t.numel() for t in kv_flat if t.requires_grad) * cache_dtype.itemsize
        offloader.learn(capture, kv_flat, grad_cache_bytes, kv_bytes, n)
    finally:
        capture.release()


def _reuse_group(
    adapter: CausalLMAdapter,
    group: Group,
    loss_fn: LossFn,
    clock: PhaseClock,
    stats: StepStats,
    tokens_per_microbatch: int | None,
    grad_cache_dtype: torch.dtype | None,
    check_finite: bool,
    track_bytes: bool,
    offloader: PromptOffloader | None,
    router: RouterLoss | None = None,
    attention: PhaseBAttention = _PADDED,
    deterministic: bool = False,
) -> torch.Tensor:
    P = group.prompt_len
    device = group.prompt.device
    exclude = _model_storages(adapter)
    capture_prompt = track_bytes or offloader is not None
    prompt_capture = SavedTensorCapture(exclude, adapter.layers) if capture_prompt else None
    cache: GradientCache | None = None
    leaves: PrefixRouterLeaves | None = None
    logits: list[torch.Tensor] | None = [] if router is not None else None
    routed = {} if logits is None else {"router_logits": logits}
    mb_capture: SavedTensorCapture | None = None
    lens = group.response_lens
    if attention.packed:  # (rows, tokens) per microbatch
        batches = pack_tokens(lens, tokens_per_microbatch)
        shapes = [(len(b), sum(lens[i] for i in b)) for b in batches]
    else:
        batches = pack_rows(lens, tokens_per_microbatch)
        shapes = [(len(b), len(b) * max(lens[i] for i in b)) for b in batches]
    shape_key = (P, attention.name, tuple(shapes))
    kv_copies = attention.impl != "triton"
    dtype = model_dtype(adapter)

    def logits_bytes(tokens: int) -> int:
        return logprob_working_bytes(adapter, tokens, dtype)

    def b_working(per_token: float, kv_bytes: int) -> int:
        return _b_working_estimate(per_token, shapes, kv_bytes, logits_bytes, kv_copies)

    needs_graph = _prompt_needs_graph(adapter)
    if offloader is not None:
        if needs_graph and offloader.wants_probe(P - 1):  # (without a graph: nothing to plan)
            _probe(adapter, group, offloader, exclude, grad_cache_dtype, router is not None)
        offloader.begin_group(prompt_capture, shape_key, P - 1, b_working)
    try:
        # ---- Phase A: prompt forward once, keeping the graph (if any parameter needs it). ----
        with (
            clock.phase("A"),
            prompt_capture.phase("A") if prompt_capture else contextlib.nullcontext(),
            contextlib.nullcontext() if needs_graph else torch.no_grad(),
        ):
            positions = torch.arange(P - 1, device=device)[None]
            cache = GradientCache(
                adapter.prompt_kv(group.prompt[None, :-1], positions, **routed), grad_cache_dtype
            )
            if router is not None:  # the prompt's routing sums, once
                leaves = PrefixRouterLeaves(
                    routing_sums(router.spec, logits, [P - 1]), grad_cache_dtype
                )
                logits.clear()
        # what phase B reads: the K/V, and a MoE prompt's routing sums
        kv_flat = [t for kv in cache.prompt_kv for t in kv] + (leaves.tensors if leaves else [])
        if prompt_capture is not None:  # phase A's peak: before any offload after it
            kv_extra = unrecorded_bytes(prompt_capture, kv_flat)
            clock.sample("A", prompt_capture.peak_nbytes + kv_extra)
        if offloader is not None:
            offloader.after_phase_a(
                prompt_capture, kv_flat, shape_key, cache.nbytes, cache.kv_bytes, P - 1, b_working
            )
        held_prompt = held_bytes(prompt_capture, kv_flat)
        stats.prompt_kv_bytes = max(stats.prompt_kv_bytes, cache.kv_bytes)
        stats.grad_cache_bytes = max(stats.grad_cache_bytes, cache.nbytes)

        # ---- Phase B: responses as microbatches over the prompt K/V. ----
        total = torch.zeros((), device=device)
        boundary = group.prompt[-1:]
        with clock.phase("B"):
            for indices in batches:
                targets = [group.responses[i] for i in indices]
                seqs = [torch.cat([boundary, t[:-1]]) for t in targets]
                lengths = [t.numel() for t in targets]
                if track_bytes:  # the prompt K/V the kernel saves are counted in held_prompt
                    mb_capture = SavedTensorCapture(exclude + kv_flat, adapter.layers)
                with mb_capture.phase("B") if mb_capture else contextlib.nullcontext():
                    if attention.packed:
                        ids, pos = packed_rows(seqs, P - 1)
                        # the reference reads the bounds on the host: keep them there (no sync)
                        cu = cu_seqlens_for(
                            lengths, device if attention.impl == "triton" else "cpu"
                        )
                        prefix = cache.packed(cu, max(lengths), attention.impl, deterministic)
                        hidden = adapter.response_hidden(ids, pos, prefix, **routed)
                        logprobs = token_logprobs(adapter, hidden[0], targets)
                        if logits is not None:  # router logits as padded rows
                            logits[:] = [unpack_rows(t, lengths) for t in logits]
                    else:
                        ids, pos = padded_rows(seqs, P - 1)
                        hidden = adapter.response_hidden(ids, pos, cache.views(), **routed)
                        logprobs = response_logprobs(adapter, hidden, [0] * len(indices), targets)
                    loss = microbatch_loss(loss_fn, logprobs, group, indices, check_finite)
                    if router is not None:  # each trajectory: prompt sums + its row's
                        rows = routing_sums(router.spec, logits, lengths)
                        loss = loss + router(with_prefix(leaves.views(), rows))
                        logits.clear()
                if mb_capture is not None:
                    clock.sample("B", held_prompt + cache.nbytes + mb_capture.peak_nbytes)
                loss.backward()
                total = total + loss.detach().to(total.dtype)
                stats.microbatches += 1
                if mb_capture is not None:
                    mb_capture.release()
                if offloader is not None:
                    offloader.poll()
                del hidden, logprobs, loss

        # ---- Phase C: prompt backward once from the gradient cache. ----
        with clock.phase("C"):
            clock.sample("C", held_prompt + cache.nbytes)
            if offloader is not None:
                offloader.start_reload()
            cache.backward(leaves.backward_pairs() if leaves is not None else ())
            if offloader is not None:
                offloader.end_group()
        return total
    except BaseException:
        if offloader is not None:
            offloader.abort()
        raise
    finally:
        if cache is not None:
            cache.release()
        if leaves is not None:
            leaves.release()
        if logits is not None:
            logits.clear()
        for capture in (prompt_capture, mb_capture):
            if capture is not None:
                capture.release()


def reuse_step(
    model: nn.Module | CausalLMAdapter,
    groups: Sequence[Group],
    loss_fn: LossFn,
    tokens_per_microbatch: int | None = None,
    *,
    grad_cache_dtype: torch.dtype | None = None,
    check_finite: bool = False,
    offloader: PromptOffloader | None = None,
    router_loss: RouterLossMode = "per-trajectory",
    attention: Attention = "auto",
    deterministic: bool = False,
) -> StepStats:
    """One training step with the reuse schedule; gradients accumulate into ``.grad``.

    Args:
        model: a supported causal LM (see :func:`hbmplan.models.adapt`) or an adapter.
        groups: groups to train; each runs phases A, B and C in turn.
        loss_fn: ``loss_fn(logprobs [S_i], group, i) -> scalar``, summed over responses.
        tokens_per_microbatch: put several responses of a group into one microbatch while its
            tokens stay within this many (packed rows: their total; padded rows: rows x longest
            row); ``None``: one response each.
        grad_cache_dtype: dtype of the gK/gV accumulators; default fp32 for 16-bit models.
        check_finite: raise ``FloatingPointError`` on a non-finite loss (one host sync per
            response).
        offloader: carries out offload plans (``hbmplan.memory`` passes its own).
        router_loss: for a MoE model whose router loss is on, add to the loss, with the dense
            trainer's gradients, "per-trajectory" each trajectory's ``coef * aux`` as its own
            forward would compute it, or "global-batch" one loss over the step's tokens (after
            a counting pass); "off" adds nothing. See :mod:`hbmplan.schedules.router`.
        attention: how phase B attends to the prompt K/V: "triton" (packed rows through the
            prefix-attention kernel, prompt K/V read in place), "reference" (packed rows through
            its PyTorch reference), "padded" (right-padded rows, plain PyTorch), or "auto":
            "triton" on CUDA when the kernel and model allow it, else "padded". See
            :mod:`hbmplan.schedules.attention`.
        deterministic: with the Triton kernel, add the prompt's dK/dV without atomics (bitwise
            reproducible; see :func:`hbmplan.kernels.prefix_attention`).

    This function alone is not atomic: use :func:`hbmplan.memory` for a step that restores
    ``.grad`` on failure. Its own buffers are released on any exit.
    """
    adapter = adapt(model)
    check_tokens_per_microbatch(tokens_per_microbatch)
    spec = resolve_router_loss(router_loss, router_spec(adapter))
    validate_groups(groups, adapter.vocab_size, adapter.max_positions, model_device(adapter))
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    check_schedulable(adapter)
    phase_b = resolve_attention(attention, adapter, groups, model_dtype(adapter), grad_cache_dtype)
    device = groups[0].prompt.device
    if offloader is not None:  # expert inputs are as large as routing makes them: no prediction
        offloader.predict = not is_moe(adapter)
    stats = StepStats("reuse", groups=len(groups), trajectories=sum(g.group_size for g in groups))
    stats.attention, stats.attention_note = phase_b.name, phase_b.why
    clock = PhaseClock(stats, device)
    router = RouterLoss(spec, router_loss) if spec is not None else None
    try:
        if router is not None and router.mode == "global-batch":
            with clock.phase("count"):
                router.set_global(*count_reuse(adapter, spec, groups, tokens_per_microbatch))
        total = None
        for group in groups:
            loss = _reuse_group(
                adapter,
                group,
                loss_fn,
                clock,
                stats,
                tokens_per_microbatch,
                grad_cache_dtype,
                check_finite,
                track_bytes=device.type != "cuda",
                offloader=offloader if offloader is not None and offloader.active else None,
                router=router,
                attention=phase_b,
                deterministic=deterministic,
            )
            total = loss if total is None else total + loss
        stats.loss = total
        if router is not None:
            stats.router = router.report()
        if offloader is not None and offloader.active:
            stats.offload = offloader.report()
        return clock.finish()
    except BaseException as exc:
        # The traceback would keep the failed microbatch's graph (and through it the gradient
        # cache) alive for as long as the caller holds the exception.
        traceback.clear_frames(exc.__traceback__)
        raise
