"""One configuration for reuse steps, validated once: :class:`ReuseConfig`.

:func:`hbmplan.memory` builds it from its keywords; :func:`hbmplan.schedules.reuse_step` takes
it (``config=``) or builds it from the same keywords. Every field is checked here, before any
step runs; the checks that need the model (the router loss on a model without one, packed rows
on a model that cannot pack) run when a step starts, still before any gradient changes.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

import torch

from hbmplan.planner.timeline import Rates
from hbmplan.token_filter import TokenFilter

__all__ = [
    "ATTENTIONS",
    "CP_BALANCES",
    "CP_EXCHANGES",
    "GRAD_SYNCS",
    "OFFLOAD_MODES",
    "ROUTER_LOSS_MODES",
    "Attention",
    "CPBalance",
    "CPExchange",
    "GradSync",
    "OffloadMode",
    "ReuseConfig",
    "RouterLossMode",
    "check_tokens_per_microbatch",
    "config_or_keywords",
    "parse_bytes",
]

Attention = Literal["auto", "triton", "reference", "padded"]
ATTENTIONS: tuple[Attention, ...] = ("auto", "triton", "reference", "padded")
OffloadMode = Literal["auto", "off", "all"]
OFFLOAD_MODES: tuple[OffloadMode, ...] = ("auto", "off", "all")
CPExchange = Literal["auto", "pass-q", "all-gather"]
CP_EXCHANGES: tuple[CPExchange, ...] = ("auto", "pass-q", "all-gather")
CPBalance = Literal["zigzag", "contiguous"]
CP_BALANCES: tuple[CPBalance, ...] = ("zigzag", "contiguous")
RouterLossMode = Literal["per-trajectory", "global-batch", "off"]
ROUTER_LOSS_MODES: tuple[RouterLossMode, ...] = ("per-trajectory", "global-batch", "off")
GradSync = Literal["phase-c", "every-microbatch"]
GRAD_SYNCS: tuple[GradSync, ...] = ("phase-c", "every-microbatch")

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


def config_or_keywords(config: object, cls: type, keywords: dict, what: str) -> object:
    """An options dataclass ``cls`` from an entry point that takes either ``config`` (an instance)
    or the same options as ``keywords`` (each at its field's default unless given): both given,
    or a ``config`` of another type, is a ``TypeError``. ``what`` names the options in it."""
    if config is None:
        return cls(**keywords)
    if not isinstance(config, cls):
        raise TypeError(f"config must be an hbmplan {cls.__name__}, got {type(config).__name__}")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    given = sorted(k for k, v in keywords.items() if v != defaults[k])
    if given:
        raise TypeError(f"pass {what} in config or as keywords, not both: got {given}")
    return config


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


@dataclass(frozen=True)
class ReuseConfig:
    """The options of a reuse step (and of the :func:`hbmplan.memory` context that runs them).

    Frozen and validated on construction: a bad value raises ``TypeError``/``ValueError`` naming
    the field and the value. ``hbm_budget`` given as a string (``"40GiB"``) is stored in bytes.
    """

    tokens_per_microbatch: int | None = None
    """Put several responses of a group into one microbatch while its tokens stay within this
    many (packed rows: their total; padded rows: rows x longest row); ``None``: one response
    per microbatch."""
    grad_cache_dtype: torch.dtype | None = None
    """Dtype of the gK/gV accumulators; ``None``: fp32 for 16-bit models, else the model's."""
    check_finite: bool = False
    """Raise ``FloatingPointError`` on a non-finite loss (one host sync per response)."""
    router_loss: RouterLossMode = "per-trajectory"
    """For a mixture-of-experts model whose router loss is on: add each trajectory's
    ``coef * aux`` as its own forward would ("per-trajectory"), one loss over the step's tokens
    ("global-batch", after a counting pass), or nothing ("off"). See
    :mod:`hbmplan.schedules.router`."""
    attention: Attention = "auto"
    """How phase B attends to the prompt K/V: "triton" (packed rows through the prefix-attention
    kernel), "reference" (packed rows through its PyTorch reference), "padded" (right-padded
    rows, plain PyTorch) or "auto" ("triton" on CUDA when the kernel and model allow it, else
    "padded"). See :mod:`hbmplan.schedules.attention`."""
    deterministic: bool = False
    """With the Triton kernel, add the prompt's dK/dV without atomics (bitwise reproducible)."""
    hbm_budget: int | None = None
    """Device bytes the schedule's activations may occupy (prompt activations, K/V, gradient
    cache, microbatch working sets; parameters, gradients and optimizer state are outside it);
    an int or a string like "80GiB". ``None``: no budget."""
    offload: OffloadMode = "auto"
    """"auto": offload dormant prompt activations (or, for plans made before phase A, recompute
    whole layers in phase C) when ``hbm_budget`` requires it; "off": never (a budget is then
    only checked: ``BudgetError`` if it cannot hold); "all": every dormant tensor."""
    rates: Rates | None = None
    """Link and compute rates the offload planner uses (``None``: docs/design.md's H200 figures)."""
    atomic: bool = True
    """:func:`hbmplan.memory` steps restore ``.grad`` if they raise (one gradient-sized buffer
    while gradients accumulate across steps). :func:`reuse_step` alone is never atomic."""
    # data parallel
    grad_sync: GradSync = "phase-c"
    """Under FSDP2 (see :mod:`hbmplan.distributed.data_parallel`): reduce-scatter the gradients
    once per step, after phase C ("phase-c": unsharded gradients held through phase B), or after
    every backward ("every-microbatch": unsharded gradients freed after each backward, one
    reduce-scatter per backward). DDP takes only "phase-c". Without data parallelism: unused."""
    # token filtering
    skip_inert: bool = True
    """Exact skipping: leave out what the loss declares carries no gradient (``loss_fn.inert``
    responses, all-inert groups, tails past ``loss_fn.loss_extent``). Gradients are unchanged;
    never with a MoE router loss on. See :mod:`hbmplan.schedules.skipping`."""
    check_skips: bool = False
    """Debug mode: skip nothing, and raise ``ValueError`` where the loss declared a response
    inert or a tail weightless but its gradient with respect to those log-probs is not zero."""
    token_filter: TokenFilter | None = None
    """Collider-style filtering (approximate, opt-in): response tokens the filter drops get zero
    gradient in every layer's backward, and linear layers' gradients come from the kept rows
    alone (:mod:`hbmplan.schedules.filtering`, docs/filtering.md). Not with a router loss."""
    # TRL
    temperature: float = 1.0
    """Log-probs are ``log_softmax(logits / temperature)``: the distribution a sampler at that
    temperature drew from, as TRL's trainers score completions (``GRPOConfig.temperature``)."""
    entropy: bool = False
    """Also compute each response token's entropy of that distribution (no gradient) into
    ``StepStats.token_entropy`` (TRL logs its mean)."""

    # tensor and context parallel
    cp_mesh: object | None = None
    """Context parallel: a 1-D ``DeviceMesh`` or ``ProcessGroup`` whose ranks split each
    prompt's phase A (each keeps its slice's K/V and activations) and share its response
    microbatches (each runs on one rank); every rank passes the same groups, and gradients are
    summed over it. ``None``: off. Runs through :func:`hbmplan.memory` (see
    :mod:`hbmplan.distributed.context_parallel`); no offload, dense models."""
    cp_exchange: CPExchange = "auto"
    """How a response microbatch reaches the other ranks' prompt slices: "pass-q" (send its
    queries, get back partial outputs and log-sum-exps), "all-gather" (gather the slices' K/V),
    or "auto" (whichever moves fewer bytes, per round of microbatches)."""
    cp_balance: CPBalance = "zigzag"
    """How the prompt is split: "zigzag" (2·cp chunks, rank r takes chunks r and 2·cp-1-r:
    equal causal work) or "contiguous" (cp chunks in order)."""

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        _check_bool("deterministic", self.deterministic)
        if self.offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be 'auto', 'off' or 'all', got {self.offload!r}")
        check_tokens_per_microbatch(self.tokens_per_microbatch)
        g = self.grad_cache_dtype
        if g is not None and not (isinstance(g, torch.dtype) and g.is_floating_point):
            raise TypeError(f"grad_cache_dtype must be a floating torch.dtype, got {g!r}")
        if self.router_loss not in ROUTER_LOSS_MODES:
            raise ValueError(
                "router_loss must be 'per-trajectory', 'global-batch' or 'off', got "
                f"{self.router_loss!r}"
            )
        if self.hbm_budget is not None:
            object.__setattr__(self, "hbm_budget", parse_bytes(self.hbm_budget))
        if self.rates is not None and not isinstance(self.rates, Rates):
            raise TypeError(f"rates must be an hbmplan Rates, got {type(self.rates).__name__}")
        _check_bool("check_finite", self.check_finite)
        _check_bool("atomic", self.atomic)
        if self.grad_sync not in GRAD_SYNCS:
            raise ValueError(
                f"grad_sync must be 'phase-c' or 'every-microbatch', got {self.grad_sync!r}"
            )
        _check_bool("skip_inert", self.skip_inert)
        _check_bool("check_skips", self.check_skips)
        if self.token_filter is not None and not isinstance(self.token_filter, TokenFilter):
            raise TypeError(
                f"token_filter must be an hbmplan TokenFilter or None, got "
                f"{type(self.token_filter).__name__}"
            )
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        object.__setattr__(self, "temperature", float(t))
        _check_bool("entropy", self.entropy)
        self._check_parallel()

    def _check_parallel(self) -> None:
        if self.cp_exchange not in CP_EXCHANGES:
            raise ValueError(f"cp_exchange must be one of {CP_EXCHANGES}, got {self.cp_exchange!r}")
        if self.cp_balance not in CP_BALANCES:
            raise ValueError(f"cp_balance must be one of {CP_BALANCES}, got {self.cp_balance!r}")
        if self.cp_mesh is None:
            return
        import torch.distributed as dist

        mesh = self.cp_mesh
        is_mesh = type(mesh).__name__ == "DeviceMesh" and hasattr(mesh, "get_group")
        if not (is_mesh or isinstance(mesh, dist.ProcessGroup)):
            raise TypeError(
                f"cp_mesh must be a 1-D DeviceMesh or a ProcessGroup, got {type(mesh).__name__}"
            )
        if is_mesh and mesh.ndim != 1:
            raise ValueError(f"cp_mesh must be 1-D (slice the CP dimension), got {mesh.ndim}-D")
        if self.offloads:
            raise ValueError(
                "context parallel runs without offload: give no hbm_budget and offload other "
                f"than 'all' with cp_mesh, got hbm_budget={self.hbm_budget}, "
                f"offload={self.offload!r}"
            )

    @property
    def offloads(self) -> bool:
        """Whether steps plan offload (or must check a budget): ``offload="all"`` or a budget."""
        return self.offload == "all" or self.hbm_budget is not None

    def replace(self, **changes) -> ReuseConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)
