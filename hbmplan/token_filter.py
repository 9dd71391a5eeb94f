"""Which response tokens Collider-style filtering drops from the backward (``token_filter=``).

A :class:`TokenFilter` decides, per response, a boolean keep-mask over its tokens, after the
forward (a rule may read the log-probs or the predictive entropy). The schedules then apply
docs/filtering.md's definition: forward unchanged; in backward every activation at a dropped
response position gets zero gradient in every layer, so each linear layer's gradients come from
the kept rows alone (:mod:`hbmplan.schedules.filtering`). This is an approximation of the dense
gradient; exact skipping of what has no gradient at all is :mod:`hbmplan.schedules.skipping`.

Three filters ship: :class:`KeepMask` (a mask in ``group.data``), :class:`EntropyQuantile`
(the highest-entropy fraction of each response, as TRL's ``top_entropy_quantile`` but per
response) and :class:`AdvantageRatio` (drop tokens with ``|A_t * ratio_t|`` below a threshold).
Subclass :class:`TokenFilter` and implement :meth:`TokenFilter.keep` for another rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from hbmplan.group import Group

__all__ = ["AdvantageRatio", "EntropyQuantile", "FilterImpl", "KeepMask", "TokenFilter"]

FilterImpl = Literal["gather", "reference"]


@dataclass(frozen=True, kw_only=True)
class TokenFilter:
    """Base of the filters: ``keep`` says which of a response's tokens keep their gradient."""

    impl: FilterImpl = "gather"
    """"gather": linear layers' backward on the kept rows (smaller dense GEMMs); "reference":
    the plain masked full-size backward (:func:`hbmplan.kernels.reference.masked_linear_ref`)."""

    def __post_init__(self) -> None:
        if self.impl not in ("gather", "reference"):
            raise ValueError(f"impl must be 'gather' or 'reference', got {self.impl!r}")

    def keeps_all(self, group: Group, i: int) -> bool:
        """True when, before any forward, response ``i`` is known to keep every token (the
        microbatch then runs the ordinary backward: bitwise no filtering)."""
        return False

    def keep(
        self, group: Group, i: int, logprobs: torch.Tensor, entropy: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """bool [n]: which of the first ``n`` tokens of response ``i`` keep their gradient.

        Args:
            logprobs: [n] detached log-probs of those tokens (n <= S_i: a masked tail that
                exact skipping dropped is not there).
            entropy: computes their predictive entropy [n] (float32; one more LM-head pass).
        """
        raise NotImplementedError


def _check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


@dataclass(frozen=True)
class KeepMask(TokenFilter):
    """``group.data[key]``: a sequence of G bool tensors [S_i], True where a token keeps its
    gradient."""

    key: str = "keep"
    """Key of the masks in ``group.data``."""

    def _mask(self, group: Group, i: int) -> torch.Tensor:
        if self.key not in group.data:
            raise KeyError(
                f"group.data must hold {self.key!r} for KeepMask, got {sorted(group.data)}"
            )
        masks, S = group.data[self.key], group.response_lens[i]
        if len(masks) != group.group_size:
            raise ValueError(f"{self.key} must hold one mask per response (G={group.group_size}), "
                             f"got {len(masks)}")  # fmt: skip
        m = masks[i]
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != (S,):
            got = (m.dtype, tuple(m.shape)) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"{self.key}[{i}] must be a bool tensor [{S}], got {got}")
        return m

    def keeps_all(self, group: Group, i: int) -> bool:
        return bool(self._mask(group, i).all())

    def keep(self, group, i, logprobs, entropy):
        return self._mask(group, i)[: logprobs.numel()].to(logprobs.device)


@dataclass(frozen=True)
class EntropyQuantile(TokenFilter):
    """Keep the ``fraction`` of each response's tokens with the highest predictive entropy:
    entropy >= the response's ``1 - fraction`` quantile (``torch.quantile``, linear). TRL's
    ``top_entropy_quantile`` takes the quantile over the batch; per response it does not depend
    on how responses are split into microbatches."""

    fraction: float = 0.2
    """Kept fraction in (0, 1]; 1 keeps everything."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fraction("fraction", self.fraction)

    def keeps_all(self, group, i):
        return self.fraction >= 1

    def keep(self, group, i, logprobs, entropy):
        h = entropy().float()
        return h >= torch.quantile(h, 1 - self.fraction)


@dataclass(frozen=True)
class AdvantageRatio(TokenFilter):
    """Drop tokens whose ``|A_t * ratio_t|`` is below ``threshold`` (``ratio = exp(logprobs -
    old)``, 1 without old log-probs): the tokens whose policy-gradient weight is smallest."""

    threshold: float = 0.0
    """Tokens with ``|A_t * ratio_t| < threshold`` are dropped; 0 keeps everything."""
    advantages_key: str = "advantages"
    """Advantages in ``group.data``: a tensor [G] or G tensors [S_i]."""
    old_logprobs_key: str = "old_logprobs"
    """Behaviour log-probs in ``group.data`` (G tensors [S_i]); may be absent."""

    def __post_init__(self) -> None:
        super().__post_init__()
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < math.inf:
            raise ValueError(f"threshold must be a finite number >= 0, got {t!r}")

    def keeps_all(self, group, i):
        return self.threshold <= 0

    def keep(self, group, i, logprobs, entropy):
        n, like = logprobs.numel(), logprobs.detach()
        adv = group.data[self.advantages_key][i].detach().to(like.device, like.dtype)
        adv = adv[:n] if adv.dim() == 1 else adv.expand(n)
        ratio = torch.ones_like(like)
        if self.old_logprobs_key in group.data:
            old = group.data[self.old_logprobs_key][i][:n].to(like.device, like.dtype)
            ratio = torch.exp(like - old)
        return (adv * ratio).abs() >= self.threshold
