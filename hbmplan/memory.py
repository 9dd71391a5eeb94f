"""``hbmplan.memory``: the context manager users train with.

It wraps a model for the duration of a ``with`` block, runs atomic reuse steps, and keeps the
measurements ``report()`` prints. The model is never edited; what the block touches on the model
(training flags, ``requires_grad``, hooks) is put back on exit, also after an exception.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hbmplan.atomic import GradStash
from hbmplan.group import Group
from hbmplan.models.adapter import CausalLMAdapter, adapt, model_device, router_spec
from hbmplan.planner.plan import Rates
from hbmplan.schedules.attention import ATTENTIONS, Attention
from hbmplan.schedules.microbatch import LossFn
from hbmplan.schedules.offload import OffloadMode, PromptOffloader
from hbmplan.schedules.reuse import check_tokens_per_microbatch, reuse_step
from hbmplan.schedules.router import RouterLossMode, resolve_router_loss
from hbmplan.schedules.stats import RouterStepStats, StepStats

__all__ = ["MemoryContext", "Report", "memory", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_bytes(value: int | str) -> int:
    """Bytes from an int or a string such as ``"80GiB"``, ``"40 GB"`` or ``"1024"``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"a byte size must be an int or a string like '80GiB', got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"a byte size must look like '80GiB' or '40GB', got {value!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"a byte size must be positive, got {value!r}")
    return n


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
    history: list[StepStats] = field(default_factory=list, repr=False)

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
        if s.router is not None:
            lines += _router_lines(s.router)
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
    """Runs reuse steps on a wrapped model; create it with :func:`hbmplan.memory`."""

    def __init__(
        self,
        model: nn.Module,
        hbm_budget: int | str | None,
        offload: OffloadMode,
        tokens_per_microbatch: int | None,
        atomic: bool,
        check_finite: bool,
        grad_cache_dtype: torch.dtype | None,
        rates: Rates | None = None,
        router_loss: RouterLossMode = "per-trajectory",
        attention: Attention = "auto",
        deterministic: bool = False,
    ) -> None:
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if not isinstance(deterministic, bool):
            raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
        if offload not in ("auto", "off", "all"):
            raise ValueError(f"offload must be 'auto', 'off' or 'all', got {offload!r}")
        check_tokens_per_microbatch(tokens_per_microbatch)
        if grad_cache_dtype is not None and not (
            isinstance(grad_cache_dtype, torch.dtype) and grad_cache_dtype.is_floating_point
        ):
            raise TypeError(
                f"grad_cache_dtype must be a floating torch.dtype, got {grad_cache_dtype!r}"
            )
        self.adapter: CausalLMAdapter = adapt(model)
        resolve_router_loss(router_loss, router_spec(self.adapter))
        self.router_loss = router_loss
        self.model = self.adapter.model
        self.hbm_budget = parse_bytes(hbm_budget) if hbm_budget is not None else None
        self.offload = offload
        self.tokens_per_microbatch = tokens_per_microbatch
        self.atomic = atomic
        self.check_finite = check_finite
        self.grad_cache_dtype = grad_cache_dtype
        self.attention = attention
        self.deterministic = deterministic
        self._offloader = PromptOffloader(
            model_device(self.adapter), self.hbm_budget, offload, rates
        )
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
    ) -> StepStats:
        """Train on ``groups`` with the reuse schedule, like ``loss.backward()``: gradients
        accumulate into ``.grad``. With ``atomic=True`` (the default) a step that raises leaves
        every ``.grad`` exactly as it was and the exception propagates.

        Args:
            groups: list of :class:`hbmplan.Group`.
            loss_fn: ``loss_fn(logprobs [S_i], group, i) -> scalar``.
            tokens_per_microbatch: overrides the context's packing budget for this step.
        """
        if not self._active:
            raise RuntimeError("step() must run inside `with hbmplan.memory(model) as mem:`")
        if tokens_per_microbatch is None:
            tokens_per_microbatch = self.tokens_per_microbatch
        stash = GradStash(self.model.parameters()) if self.atomic else None
        try:
            stats = reuse_step(
                self.adapter,
                groups,
                loss_fn,
                tokens_per_microbatch,
                grad_cache_dtype=self.grad_cache_dtype,
                check_finite=self.check_finite,
                offloader=self._offloader,
                router_loss=self.router_loss,
                attention=self.attention,
                deterministic=self.deterministic,
            )
        except BaseException:
            if stash is not None:
                stash.restore()
            self._report.failed_steps += 1
            raise
        if stash is not None:
            stash.merge()
        self._report.steps += 1
        self._report.last = stats
        self._report.history.append(stats)
        return stats

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
) -> MemoryContext:
    """Wrap ``model`` for reuse-schedule training.

    Args:
        model: a Hugging Face causal LM of a supported family or an hbmplan ``ReferenceDecoder``.
        hbm_budget: device bytes the schedule's activations may occupy (int or "80GiB"):
            prompt activations, K/V, gradient cache and microbatch working sets; parameters,
            gradients and optimizer state are outside it. ``None``: no budget.
        offload: "auto" offloads dormant prompt activations (or, for plans made before phase
            A, recomputes whole layers in phase C) when the budget requires it,
            "off" never (a budget is then only checked: ``BudgetError`` if it cannot hold),
            "all" every dormant tensor.
        rates: link and compute rates the planner uses (default: docs/design.md's H200 figures).
        tokens_per_microbatch: default packing budget for response microbatches.
        atomic: restore ``.grad`` if a step raises (costs one gradient-sized buffer only when
            ``.grad`` already holds values at the start of the step; set ``False`` to skip).
        check_finite: raise ``FloatingPointError`` on a non-finite loss.
        grad_cache_dtype: gK/gV accumulation dtype; default fp32 for 16-bit models.
        router_loss: for a mixture-of-experts model whose router loss is on (Hugging Face:
            ``config.output_router_logits`` and ``router_aux_loss_coef > 0``; hbmplan's
            ``MoEDecoder``: a positive coefficient in its config), what each step adds to the
            loss, with the dense trainer's value and gradients: "per-trajectory" each
            trajectory's ``coef * aux`` as its own forward computes it (Hugging Face's
            semantics), "global-batch" one loss over all tokens of the step (prompt tokens
            weighted G; costs a forward-only counting pass), "off" nothing. Prompt tokens go
            through the experts once per step; ``report()`` shows per-expert token counts. See
            :mod:`hbmplan.schedules.router`.
        attention: how response microbatches attend to the prompt K/V: "auto" (the Triton
            prefix-attention kernel over packed rows on CUDA when the model allows, else padded
            rows), "triton", "reference" (packed rows, PyTorch) or "padded". See
            :mod:`hbmplan.schedules.attention`.
        deterministic: bitwise-reproducible Triton backward (no atomics in the prompt dK/dV).
    """
    return MemoryContext(
        model,
        hbm_budget,
        offload,
        tokens_per_microbatch,
        atomic,
        check_finite,
        grad_cache_dtype,
        rates,
        router_loss,
        attention,
        deterministic,
    )
