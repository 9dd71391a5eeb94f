"""GRPO/PPO clipped policy-gradient losses usable directly as an hbmplan ``loss_fn``.

The schedules sum ``loss_fn(logprobs, group, i)`` over every response of every group, so the
normalisation over a group (token-mean, sequence-mean) is built into each per-response term.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from hbmplan.group import Group

__all__ = ["Aggregation", "PolicyLoss", "group_advantages"]

Aggregation = Literal["token-mean", "sequence-mean", "token-sum"]
_AGGREGATIONS = ("token-mean", "sequence-mean", "token-sum")


@dataclass(frozen=True)
class PolicyLoss:
    """Clipped policy-gradient loss with an optional k3 KL penalty; call it as a ``loss_fn``.

    Per token t of response i, with ratio ``r = exp(logprobs - old)`` and advantage ``A``::

        pg   = -min(r * A, clip(r, 1 - clip_eps_low, 1 + clip_eps_high) * A)
        pg   = min(pg, -dual_clip * A)   where A < 0, if dual_clip is set
        kl   = exp(ref - logprobs) - (ref - logprobs) - 1
        loss = scale * sum_t weight_i * (pg + kl_coef * kl)

    ``weight_i`` comes from ``aggregation`` and the group's response lengths, so summing the
    per-response losses over the group gives the aggregated loss of the whole group. Reads from
    ``group.data``: advantages (a tensor [G], one per response, or a sequence of G tensors [S_i],
    one per token), optionally old log-probs (a sequence of G tensors [S_i]; when absent the ratio
    is taken against ``logprobs.detach()``: on-policy, ratio 1, gradient ``-A * d logprobs``) and,
    when ``kl_coef > 0``, reference log-probs (a sequence of G tensors [S_i]). These are treated as
    constants (detached) and moved to the device and dtype of ``logprobs``.
    """

    clip_eps_low: float = 0.2
    """Lower clip epsilon: the ratio is clipped below at ``1 - clip_eps_low``. Must be >= 0."""
    clip_eps_high: float | None = None
    """Upper clip epsilon: the ratio is clipped above at ``1 + clip_eps_high``. ``None`` means
    ``clip_eps_low``; a larger value is DAPO's "clip-higher". Must be >= 0."""
    dual_clip: float | None = None
    """Dual-clip constant c (> 1): for negative advantages the per-token loss is capped at
    ``-c * A``, so a huge ratio cannot produce an unbounded loss. ``None`` turns it off."""
    kl_coef: float = 0.0
    """Weight of the k3 KL estimator against the reference policy. Must be >= 0; 0 turns the term
    off and ``ref_logprobs`` is then never read."""
    aggregation: Aggregation = "token-mean"
    """How tokens of a group are weighted: ``"token-mean"`` 1 / (total response tokens of the
    group), ``"sequence-mean"`` 1 / (S_i * G), ``"token-sum"`` 1."""
    scale: float = 1.0
    """Multiplies the loss (> 0). The schedules *sum* over groups: set ``1 / num_groups`` to
    average the per-group losses instead."""
    advantages_key: str = "advantages"
    """Key of the advantages in ``group.data``."""
    old_logprobs_key: str = "old_logprobs"
    """Key of the behaviour policy's log-probs in ``group.data``; may be absent (on-policy)."""
    ref_logprobs_key: str = "ref_logprobs"
    """Key of the reference policy's log-probs in ``group.data``; needed when ``kl_coef > 0``."""

    def __post_init__(self) -> None:
        if self.clip_eps_high is None:
            object.__setattr__(self, "clip_eps_high", self.clip_eps_low)
        for name in ("clip_eps_low", "clip_eps_high", "kl_coef"):
            value = getattr(self, name)
            if not _is_real(value) or not value >= 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.dual_clip is not None and (
            not _is_real(self.dual_clip) or not 1 < self.dual_clip < math.inf
        ):
            raise ValueError(
                f"dual_clip must be None or a finite number > 1, got {self.dual_clip!r}"
            )
        if not _is_real(self.scale) or not 0 < self.scale < math.inf:
            raise ValueError(f"scale must be a finite number > 0, got {self.scale!r}")
        if self.aggregation not in _AGGREGATIONS:
            raise ValueError(
                f"aggregation must be one of {_AGGREGATIONS}, got {self.aggregation!r}"
            )

    def __call__(self, logprobs: torch.Tensor, group: Group, i: int) -> torch.Tensor:
        """Loss of response ``i``: a differentiable scalar in the dtype of ``logprobs``.

        Args:
            logprobs: [S_i] float32/float64 log p(r_i[t] | prompt, r_i[:t]), differentiable.
            group: the :class:`hbmplan.Group` response ``i`` belongs to.
            i: index of the response in ``group.responses``.
        """
        return self.scale * (self.token_losses(logprobs, group, i) * self.weight(group, i)).sum()

    def token_losses(self, logprobs: torch.Tensor, group: Group, i: int) -> torch.Tensor:
        """Unweighted per-token loss ``pg + kl_coef * kl`` of response ``i``: [S_i]."""
        S = group.response_lens[i]
        if not isinstance(logprobs, torch.Tensor) or not logprobs.is_floating_point():
            kind = logprobs.dtype if isinstance(logprobs, torch.Tensor) else type(logprobs).__name__
            raise TypeError(f"logprobs must be a floating-point tensor, got {kind}")
        if logprobs.shape != (S,):
            raise ValueError(
                f"logprobs must have shape [{S}] like response {i}, got {tuple(logprobs.shape)}"
            )
        adv = self._advantages(group, i, logprobs)
        if self.old_logprobs_key in group.data:
            old = _per_token(group, self.old_logprobs_key, i, logprobs)
        else:
            old = logprobs.detach()
        ratio = torch.exp(logprobs - old)
        clipped = ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high)
        pg = torch.maximum(-ratio * adv, -clipped * adv)
        if self.dual_clip is not None:
            pg = torch.where(adv < 0, torch.minimum(pg, -self.dual_clip * adv), pg)
        if self.kl_coef > 0:
            log_ratio = _per_token(group, self.ref_logprobs_key, i, logprobs) - logprobs
            return pg + self.kl_coef * (torch.exp(log_ratio) - log_ratio - 1)
        return pg

    def inert(self, group: Group, i: int) -> bool:
        """Whether response ``i``'s loss has gradient exactly zero: its advantage is exactly 0
        (every token's, for per-token advantages) and ``kl_coef == 0``. The schedules then skip
        it (:mod:`hbmplan.schedules.skipping`); they never do while a router loss is on."""
        if self.kl_coef != 0:
            return False
        return not bool(self._raw_advantages(group, i).any())

    def loss_extent(self, group: Group, i: int) -> int:
        """Leading tokens of response ``i`` that carry loss weight: up to its last token with a
        non-zero advantage (per-token advantages; a zero-advantage token's loss has gradient
        exactly zero when ``kl_coef == 0``), else all ``S_i``."""
        S = group.response_lens[i]
        adv = self._raw_advantages(group, i)
        if self.kl_coef != 0 or adv.dim() == 0:
            return S if self.kl_coef != 0 or bool(adv != 0) else 0
        nonzero = adv.ne(0).nonzero()
        return int(nonzero[-1]) + 1 if nonzero.numel() else 0

    def _raw_advantages(self, group: Group, i: int) -> torch.Tensor:
        """Response ``i``'s advantage(s) as given, checked: 0-d, or [S_i] per token."""
        adv = _lookup(group, self.advantages_key)
        if isinstance(adv, torch.Tensor):
            return self._advantages(group, i, adv)  # in its own dtype: no rounding to 0
        value = adv[i] if isinstance(adv, Sequence) and i < len(adv) else None
        like = value if isinstance(value, torch.Tensor) else torch.empty(0)
        return _per_token(group, self.advantages_key, i, like)

    def weight(self, group: Group, i: int) -> float:
        """Weight of each token of response ``i`` under ``aggregation`` (before ``scale``)."""
        if self.aggregation == "token-mean":
            return 1.0 / sum(group.response_lens)
        if self.aggregation == "sequence-mean":
            return 1.0 / (group.response_lens[i] * group.group_size)
        return 1.0

    def _advantages(self, group: Group, i: int, like: torch.Tensor) -> torch.Tensor:
        """Advantages of response ``i`` as [S_i] or a broadcastable 0-d tensor."""
        key, G = self.advantages_key, group.group_size
        adv = _lookup(group, key)
        if isinstance(adv, torch.Tensor):
            if adv.shape != (G,):
                raise ValueError(
                    f"{key} given as a tensor must have shape [G={G}] (one per response), "
                    f"got {tuple(adv.shape)}; give per-token advantages as a list of [S_i] tensors"
                )
            return adv[i].detach().to(like.device, like.dtype)
        return _per_token(group, key, i, like)


def group_advantages(
    rewards: torch.Tensor, eps: float = 1e-6, std_normalise: bool = True
) -> torch.Tensor:
    """GRPO group-normalised advantages ``(reward - mean) / (std + eps)``.

    Args:
        rewards: [G] one scalar reward per response of a group, G >= 1.
        eps: added to the standard deviation so a group of equal rewards gives zeros, not NaN.
        std_normalise: ``False`` gives ``reward - mean`` (Dr. GRPO, no division by std).

    Returns:
        [G] advantages, floating point (integer rewards become the default dtype). The std is the
        unbiased (Bessel-corrected) one, as in GRPO; with G = 1, or all rewards equal, the
        advantages are exactly 0.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or rewards.numel() == 0:
        shape = (
            tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        )
        raise ValueError(f"rewards must be a non-empty 1-D tensor [G], got {shape}")
    if not _is_real(eps) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    if bool((rewards == rewards[0]).all()):
        # A tied group has advantage exactly 0 (so exact skipping can leave it out): the mean of
        # equal floats may round (1 tied group in 3 of float32 uniforms), and the difference,
        # divided by std + eps with std ~ 1e-8, would be ~1e-2 of noise, not 0.
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean()
    if not std_normalise:
        return centred
    std = rewards.std(correction=1 if rewards.numel() > 1 else 0)
    return centred / (std + eps)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _lookup(group: Group, key: str) -> Any:
    if key not in group.data:
        raise KeyError(f"group.data must hold {key!r}, got keys {sorted(group.data)}")
    return group.data[key]


def _per_token(group: Group, key: str, i: int, like: torch.Tensor) -> torch.Tensor:
    """``group.data[key][i]`` checked to be a tensor [S_i], detached, on like's device and dtype."""
    seq, G, S = _lookup(group, key), group.group_size, group.response_lens[i]
    if (
        not isinstance(seq, (Sequence, torch.Tensor))
        or isinstance(seq, str)
        or (isinstance(seq, torch.Tensor) and seq.dim() == 0)
    ):
        raise TypeError(f"{key} must be a sequence of G={G} tensors, got {type(seq).__name__}")
    if len(seq) != G:
        raise ValueError(f"{key} must hold one entry per response (G={G}), got {len(seq)}")
    value = seq[i]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{key}[{i}] must be a tensor [{S}], got {type(value).__name__}")
    if value.shape != (S,):
        raise ValueError(
            f"{key}[{i}] must have shape [{S}] like response {i}, got {tuple(value.shape)}"
        )
    return value.detach().to(like.device, like.dtype)
