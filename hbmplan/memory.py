"""``hbmplan.memory``: the context manager users train with.

It wraps a model for the duration of a ``with`` block, runs atomic reuse steps, and keeps the
measurements ``report()`` prints. The model is never edited; what the block touches on the model
(training flags, ``requires_grad``, hooks) is put back on exit, also after an exception.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hbmplan.atomic import GradStash
from hbmplan.capacity.flops import skipped_flops
from hbmplan.capacity.presets import model_spec
from hbmplan.config import (
    Attention,
    CPBalance,
    CPExchange,
    GradSync,
    OffloadMode,
    ReuseConfig,
    RouterLossMode,
    parse_bytes,
)
from hbmplan.distributed.data_parallel import (
    DDPSync,
    all_ranks,
    data_parallel,
    sum_router_counts,
    unwrap,
)
from hbmplan.distributed.step_hooks import DataParallelParticipant
from hbmplan.errors import DataParallelError
from hbmplan.group import Group
from hbmplan.models.adapter import CausalLMAdapter, adapt, model_device
from hbmplan.planner import Rates
from hbmplan.runtime import Participant, offload_participants
from hbmplan.runtime.stats import RouterStepStats, StepStats
from hbmplan.schedules.microbatch import LossFn
from hbmplan.schedules.reuse import run_step
from hbmplan.schedules.router import resolve_router_loss
from hbmplan.token_filter import TokenFilter

__all__ = ["MemoryContext", "Report", "memory", "parse_bytes"]


@dataclass
class Report:
    """What a :class:`MemoryContext` measured.

    Attributes:
        steps: steps completed inside the context.
        last: the last completed step's statistics (``None`` before the first).
        failed_steps: steps that raised (their gradients were restored).
    """

    steps: int = 0
    last: StepStats | None = None
    failed_steps: int = 0

    def __str__(self) -> str:
        if self.last is None:
            return "hbmplan: no step completed yet"
        s = self.last
        mib = 2**20
        lines = [
            f"hbmplan {s.schedule} step {self.steps}: {s.groups} group(s), "
            f"{s.trajectories} trajectories, {s.microbatches} microbatches",
            f"{'phase':<8}{'time ms':>10}{'peak MiB':>12}",
        ]
        for name, p in s.phases.items():
            lines.append(f"{name:<8}{p.seconds * 1e3:>10.1f}{p.peak_bytes / mib:>12.1f}")
        lines.append(
            f"prompt K/V {s.prompt_kv_bytes / mib:.1f} MiB, gradient cache "
            f"{s.grad_cache_bytes / mib:.1f} MiB, peaks from {s.memory_source}"
        )
        if s.attention:
            note = f" (auto: {s.attention_note})" if s.attention_note else ""
            lines.append(f"phase B attention: {s.attention}{note}")
        off = s.offload
        if off is not None and off.engine is not None:
            e = off.engine
            lines.append(
                f"offloaded {e.bytes_offloaded / mib:.1f} MiB ({e.d2h_gbps:.1f} GB/s), "
                f"prefetched {e.bytes_prefetched / mib:.1f} MiB ({e.h2d_gbps:.1f} GB/s), "
                f"exposed wait {e.exposed_wait_s * 1e3:.1f} ms"
                f"{', streamed in phase A' if off.streamed else ''} (totals of this context)"
            )
        if off is not None and off.predicted:
            how = "replanned after phase A: the prediction missed" if off.mismatch else "exact"
            lines.append(f"plan predicted from the last capture, rescaled ({how})")
        if off is not None and off.plan is not None:
            lines.append(str(off.plan))
        k = s.skipped
        if k.responses or k.tokens:
            flops = f", {k.flops_saved / 1e9:.3g} GFLOP saved" if k.flops_saved is not None else ""
            lines.append(
                f"skipped (exact): {k.responses} inert response(s), {k.groups} whole group(s), "
                f"{k.tokens} response token(s){flops}"
            )
        if s.filtered_tokens:
            lines.append(f"filtered (approximate): {s.filtered_tokens} response token(s)")
        if s.router is not None:
            lines += _router_lines(s.router)
        if s.data_parallel is not None:
            lines.append(str(s.data_parallel))
        if self.failed_steps:
            lines.append(f"{self.failed_steps} step(s) failed and were rolled back")
        return "\n".join(lines)


def _router_lines(r: RouterStepStats) -> list[str]:
    z = f", z-loss {float(r.z_loss):.6g}" if r.z_loss is not None else ""
    counts = r.expert_tokens.sum(0).tolist()
    lines = [
        f"router loss ({r.mode}) {float(r.loss):.6g}: load balancing {float(r.aux_loss):.6g}{z}",
        f"tokens per expert as the dense trainer counts them (prompt x G + responses, (token, "
        f"slot) pairs summed over {r.expert_tokens.shape[0]} router layers):",
    ]
    lines += [
        "  " + " ".join(f"{c:>7d}" for c in counts[i : i + 12]) for i in range(0, len(counts), 12)
    ]
    return lines


class MemoryContext:
    """Runs reuse steps on a wrapped model; create it with :func:`hbmplan.memory`.

    Args:
        model: the model (or its adapter).
        config: the steps' options (validated when it was built).
        participants: more phase-hook participants for every step, run after the context's own
            offload participants (see :mod:`hbmplan.runtime.participant`).
    """

    def __init__(
        self,
        model: nn.Module | CausalLMAdapter,
        config: ReuseConfig,
        participants: Sequence[Participant] = (),
    ) -> None:
        if not isinstance(config, ReuseConfig):
            raise TypeError(f"config must be an hbmplan ReuseConfig, got {type(config).__name__}")
        self.data_parallel = (
            data_parallel(model, config.grad_sync) if isinstance(model, nn.Module) else None
        )
        self.adapter: CausalLMAdapter = adapt(
            unwrap(model) if isinstance(model, nn.Module) else model
        )
        resolve_router_loss(config.router_loss, self.adapter.router)
        self.config = config
        self.model = self.adapter.model
        self._planner, self._offloader, offload = offload_participants(
            model_device(self.adapter), config
        )
        self._participants = [*offload, *participants]
        self._cp = None
        if config.cp_mesh is not None:
            from hbmplan.distributed.context_parallel import CPComm, cp_group

            if participants:
                raise ValueError("context parallel steps take no participants yet")
            if isinstance(self.data_parallel, DDPSync):
                raise DataParallelError(
                    "a DistributedDataParallel model with cp_mesh: not supported yet; shard the "
                    "model with fully_shard on the mesh's data-parallel dimension instead"
                )
            if self.data_parallel is not None and config.grad_sync == "every-microbatch":
                raise DataParallelError(
                    "grad_sync='every-microbatch' with cp_mesh: a context-parallel step reduces "
                    "once after the step; use grad_sync='phase-c'"
                )
            self._cp = CPComm(cp_group(config.cp_mesh))
        self._dp_part = None
        if self.data_parallel is not None:
            self._dp_part = DataParallelParticipant(self.data_parallel)
            self._participants.append(self._dp_part)
        self._report = Report()
        self._active = False
        self._saved_state: tuple[dict[nn.Module, bool], dict[nn.Parameter, bool]] | None = None

    def __enter__(self) -> MemoryContext:
        if self._active:
            raise RuntimeError("this hbmplan.memory context is already active")
        self._saved_state = (
            {m: m.training for m in self.model.modules()},
            {p: p.requires_grad for p in self.model.parameters()},
        )
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        assert self._saved_state is not None
        training, requires_grad = self._saved_state
        for m, flag in training.items():
            m.training = flag
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        self._saved_state = None
        self._active = False
        self._offloader.close()  # the host pool is given back; a re-entry allocates anew

    def step(
        self,
        groups: Sequence[Group],
        loss_fn: LossFn,
        tokens_per_microbatch: int | None = None,
        token_filter: TokenFilter | None = None,
        *,
        sync: bool = True,
    ) -> StepStats:
        """Train on ``groups`` with the reuse schedule, like ``loss.backward()``: gradients
        accumulate into ``.grad``. With ``atomic=True`` (the default) a step that raises leaves
        every ``.grad`` exactly as it was and the exception propagates.

        Under FSDP2 or DDP every rank calls ``step`` with its own groups (a group never spans
        ranks) and the same ``sync``; afterwards every rank holds the gradients of the union of
        all ranks' groups divided by the world size. A step that fails on one rank raises on
        every rank (:class:`hbmplan.errors.RankFailureError` where it succeeded, its own error
        where it failed) and every rank's gradients are restored.

        Args:
            groups: list of :class:`hbmplan.Group`.
            loss_fn: ``loss_fn(logprobs [S_i], group, i) -> scalar``.
            tokens_per_microbatch: overrides the context's packing budget for this step.
            token_filter: overrides the context's token filter for this step (``None``: the
                context's).
            sync: data parallel only: reduce the gradients across ranks after this step
                (``True``), or accumulate them locally (``False``; the next ``sync=True`` step
                reduces the accumulated total once). Without data parallelism: ignored.
        """
        if not self._active:
            raise RuntimeError("step() must run inside `with hbmplan.memory(model) as mem:`")
        config = self.config
        if tokens_per_microbatch is not None:
            config = config.replace(tokens_per_microbatch=tokens_per_microbatch)
        if token_filter is not None:
            config = config.replace(token_filter=token_filter)
        stash = GradStash(self.model.parameters()) if config.atomic else None
        dp = self.data_parallel
        if self._dp_part is not None:
            self._dp_part.prepare(sync)
        try:
            if self._cp is not None:
                from hbmplan.distributed.context_parallel import cp_step

                if dp is not None:  # DP x CP: gathered for the step, one vote and reduction
                    dp.begin(0, sync)
                try:
                    stats = cp_step(self.adapter, groups, loss_fn, config, self._cp)
                except BaseException as exc:
                    if dp is not None:
                        dp.end(False, exc)
                    raise
                if dp is not None:
                    dp.end(True, None)
            else:
                try:
                    if dp is not None and not groups:  # no work here: join the others' collectives
                        dp.begin(0, sync)
                        self._join_router_counts(config)
                        stats = StepStats("reuse")
                    else:
                        stats = run_step(self.adapter, groups, loss_fn, config, self._participants)
                except BaseException as exc:
                    if (
                        dp is not None
                    ):  # every rank votes, also one that failed before the step began
                        if not dp._active:
                            dp.begin(0, sync)
                        self._join_router_counts(config)
                        dp.end(False, exc)
                    raise
                if dp is not None:
                    dp.end(True, None)  # raises when another rank failed
        except BaseException:
            if stash is not None:
                stash.restore()
            self._report.failed_steps += 1
            raise
        if stash is not None:
            stash.merge()
        if dp is not None:
            dp.after_merge(sync)
            stats.data_parallel = dp.stats
            all_ranks(dp.stats, stats.seconds, stats.peak_bytes, dp.group)
        if stats.skipped.shapes:
            try:
                flops = skipped_flops(model_spec(self.model), stats.skipped.shapes)
            except (TypeError, ValueError):  # a model whose shape the FLOP model cannot read
                flops = None
            stats.skipped = dataclasses.replace(stats.skipped, flops_saved=flops)
        self._report.steps += 1
        self._report.last = stats
        return stats

    @property
    def cp_bytes(self) -> dict[str, int]:
        """Context parallel: bytes this rank received per phase ("A", "B", "C"), totals over the
        context's steps; empty without ``cp_mesh``."""
        return dict(self._cp.received) if self._cp is not None else {}

    def _join_router_counts(self, config: ReuseConfig) -> None:
        """A rank with no groups, or one that failed before its counting pass, still joins the
        ranks' sum of global-batch router counts (the collective sequence stays the same)."""
        part = self._dp_part
        if part is None or part.counted:
            return
        if config.router_loss == "global-batch" and self.adapter.router is not None:
            part.counted = True
            sum_router_counts(None, 0, part.engine.group)

    def report(self) -> Report:
        """Measurements so far: per-phase time and peak memory, K/V and gradient-cache bytes."""
        return self._report


def memory(
    model: nn.Module,
    hbm_budget: int | str | None = None,
    offload: OffloadMode = "auto",
    *,
    tokens_per_microbatch: int | None = None,
    atomic: bool = True,
    check_finite: bool = False,
    grad_cache_dtype: torch.dtype | None = None,
    rates: Rates | None = None,
    router_loss: RouterLossMode = "per-trajectory",
    attention: Attention = "auto",
    deterministic: bool = False,
    participants: Sequence[Participant] = (),
    grad_sync: GradSync = "phase-c",
    skip_inert: bool = True,
    check_skips: bool = False,
    token_filter: TokenFilter | None = None,
    cp_mesh: object | None = None,
    cp_exchange: CPExchange = "auto",
    cp_balance: CPBalance = "zigzag",
    temperature: float = 1.0,
    entropy: bool = False,
) -> MemoryContext:
    """Wrap ``model`` for reuse-schedule training.

    Args:
        model: a Hugging Face causal LM of a supported family or an hbmplan ``ReferenceDecoder``.
        hbm_budget, offload, tokens_per_microbatch, atomic, check_finite, grad_cache_dtype,
            rates, router_loss, attention, deterministic: the steps' options, validated here
            into one :class:`hbmplan.ReuseConfig` (each documented there): the activation
            budget ("80GiB"), whether dormant prompt activations are offloaded ("auto", "off",
            "all"), the default packing budget of response microbatches, whether a failed step
            restores ``.grad``, the finite-loss check, the gK/gV dtype, the planner's link and
            compute rates, a mixture-of-experts model's router loss ("per-trajectory",
            "global-batch", "off"; see :mod:`hbmplan.schedules.router`), phase B's attention
            ("auto", "triton", "reference", "padded"; see :mod:`hbmplan.schedules.attention`)
            and a bitwise-reproducible Triton backward.
        skip_inert, check_skips: exact skipping of what the loss declares carries no gradient,
            and its debug check (see :mod:`hbmplan.schedules.skipping`).
        token_filter: Collider-style filtering of response tokens in the backward (approximate,
            opt-in; see :mod:`hbmplan.token_filter`).
        temperature, entropy: log-probs of logits / temperature, and per-token entropies in the
            step's stats (what TRL's trainers score with; see :class:`hbmplan.ReuseConfig`).
        participants: more phase-hook participants for every step (see
            :mod:`hbmplan.runtime.participant`).
        grad_sync: for an FSDP2 model, when gradients are reduce-scattered: "phase-c" (once per
            step) or "every-microbatch" (after every backward); see
            :class:`hbmplan.ReuseConfig`. A DDP model takes "phase-c" only.

    A model wrapped with ``fully_shard`` (each decoder layer and the root) or
    ``DistributedDataParallel`` trains data-parallel: see :meth:`MemoryContext.step` and
    :mod:`hbmplan.distributed.data_parallel`.
        cp_mesh, cp_exchange, cp_balance: context parallel (a 1-D ``DeviceMesh`` or
            ``ProcessGroup`` splitting each prompt over its ranks; how responses reach the
            slices; how the prompt is split), see :mod:`hbmplan.distributed.context_parallel`.
            A model parallelised with DTensor tensor parallel needs nothing here.
    """
    config = ReuseConfig(
        tokens_per_microbatch=tokens_per_microbatch, grad_cache_dtype=grad_cache_dtype,
        check_finite=check_finite, router_loss=router_loss, attention=attention,
        deterministic=deterministic, hbm_budget=hbm_budget, offload=offload, rates=rates,
        atomic=atomic, grad_sync=grad_sync, skip_inert=skip_inert, check_skips=check_skips,
        token_filter=token_filter, cp_mesh=cp_mesh, cp_exchange=cp_exchange, cp_balance=cp_balance,
        temperature=temperature, entropy=entropy,
    )  # fmt: skip
    return MemoryContext(model, config, participants)
