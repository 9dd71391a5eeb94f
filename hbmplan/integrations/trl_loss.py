"""TRL 1.16's GRPO objective for one completion, as an hbmplan loss, and TRL's per-micro-batch
metrics rebuilt from the rows wherever they trained.

Per token t of row r (TRL ``_compute_loss``, token-level importance sampling)::

    ratio  = exp(logp - old)                   old = logp.detach() when TRL has no old log-probs
    kl     = exp(ref - logp) - (ref - logp) - 1, times ratio with use_bias_correction_kl
    clip   = clamp(ratio, 1 - eps_low, 1 + eps_high);  ratio = min(ratio, delta) with delta
    loss_t = -min(ratio * A_r, clip * A_r) [* vLLM importance ratio] [+ beta * kl]

and the row adds ``weight_r * sum_t mask_t * loss_t`` (``trl_batches.row_weights``). Sums over rows and tokens are linear, so any grouping of rows gives TRL's loss and
gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["MetricWindow", "Objective", "Row"]


@dataclass(frozen=True)
class Objective:
    """The trainer's settings the per-token loss reads."""

    beta: float
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    bias_correction_kl: bool


@dataclass
class Row:
    """One completion's data, sliced to its S tokens (all detached, on the model's device)."""

    mask: torch.Tensor
    """[S] float loss mask."""
    advantage: torch.Tensor
    """[] or [S]."""
    weight: torch.Tensor
    """[] the row's factor in TRL's loss."""
    batch: int
    """The TRL micro-batch whose metrics the row belongs to."""
    old: torch.Tensor | None = None
    ref: torch.Tensor | None = None
    is_ratio: torch.Tensor | None = None
    """vLLM importance-sampling ratio, [S] or [1]."""
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """Filled by :meth:`loss`: detached per-token values for the metrics."""

    def loss(self, logp: torch.Tensor, objective: Objective) -> torch.Tensor:
        """``weight * sum_t mask_t * loss_t`` for log-probs ``logp`` [S] (differentiable)."""
        o = objective
        old = logp.detach() if self.old is None else self.old.to(logp.dtype)
        coef_1 = torch.exp(logp - old)
        kl = None
        if o.beta != 0.0:
            ref = self.ref.to(logp.dtype)
            kl = torch.exp(ref - logp) - (ref - logp) - 1
            if o.bias_correction_kl:
                kl = kl * coef_1
        coef_2 = torch.clamp(coef_1, 1 - o.epsilon_low, 1 + o.epsilon_high)
        if o.delta is not None:
            coef_1 = torch.clamp(coef_1, max=o.delta)
        adv = self.advantage.to(logp.dtype)
        per_token = -torch.min(coef_1 * adv, coef_2 * adv)
        if self.is_ratio is not None:
            per_token = per_token * self.is_ratio.to(logp.dtype)
        if kl is not None:
            per_token = per_token + o.beta * kl
        mask = self.mask.to(logp.dtype)
        with torch.no_grad():
            ratio = coef_1.detach()
            low = ((ratio < 1 - o.epsilon_low) & (adv < 0)).to(mask.dtype)
            high = ((ratio > 1 + o.epsilon_high) & (adv > 0)).to(mask.dtype)
            self.stats = {"low": low, "high": high, "region": torch.maximum(low, high)}
            if kl is not None:
                self.stats["kl"] = kl.detach()
        return (per_token * mask).sum() * self.weight.to(logp.dtype)


class MetricWindow:
    """TRL appends its loss metrics once per micro-batch, each over that micro-batch's tokens.
    Rows regrouped by prompt train in other micro-batches, so their detached per-token values
    are summed per TRL micro-batch here, and a micro-batch's metrics are appended when its last
    row has trained (in one optimizer step with TRL's default batching, so every logged mean is
    TRL's).

    Args:
        rows_per_batch: rows of each TRL micro-batch (of one pass over the generation batch).
        beta: KL coefficient (the "kl" metric is logged only when it is non-zero).
    """

    _SUMS = ("kl", "entropy", "low", "high", "region", "tokens")

    def __init__(self, rows_per_batch: dict[int, int], beta: float) -> None:
        self.rows_per_batch = dict(rows_per_batch)
        self.beta = beta
        self._open: dict[int, dict] = {}

    def _state(self, j: int) -> dict:
        if j not in self._open:
            self._open[j] = {
                "left": self.rows_per_batch[j],
                **{k: 0.0 for k in self._SUMS},
                "low_seq": [],
                "high_seq": [],
            }
        return self._open[j]

    def add(
        self, j: int, mask: torch.Tensor | None, stats: dict, entropy: torch.Tensor | None
    ) -> None:
        """Row of batch ``j``: its mask [S] (``None`` for a row with no loss tokens), the stats of
        :meth:`Row.loss` and its per-token entropy [S]. Sums stay on the device until
        :meth:`flush`."""
        s = self._state(j)
        s["left"] -= 1
        if mask is None:  # no tokens: TRL's per-row means are 0/0 (NaN), skipped by nanmin
            return
        n = mask.sum()
        s["tokens"] = s["tokens"] + n
        for key in ("low", "high", "region", "kl"):
            if key in stats:
                s[key] = s[key] + (stats[key] * mask).sum()
        if entropy is not None:
            s["entropy"] = s["entropy"] + (entropy.to(mask.dtype) * mask).sum()
        s["low_seq"].append((stats["low"] * mask).sum() / n)
        s["high_seq"].append((stats["high"] * mask).sum() / n)

    def flush(self, metrics: dict[str, list], gather=None) -> None:
        """Append the metrics of every micro-batch whose rows have all trained, in TRL's keys.

        Args:
            metrics: TRL's ``_metrics["train"]`` (lists of floats).
            gather: data parallel: concatenates a [n, 8] tensor over the ranks into [W * n, 8]
                (``accelerator.gather`` after moving it to the accelerator's device). Each TRL micro-batch's sums are then added over the ranks and its
                minimum / maximum taken over every rank's rows, as TRL reduces them. It is a
                collective: call it on every rank at the same point (the pass's last
                micro-batch), when every rank has closed the same micro-batches.
        """
        closed = [j for j in sorted(self._open) if self._open[j]["left"] <= 0]
        rows = []
        for j in closed:
            s = self._open.pop(j)
            low = [x for x in map(float, s["low_seq"]) if not math.isnan(x)]
            high = [x for x in map(float, s["high_seq"]) if not math.isnan(x)]
            rows.append(
                [float(s[k]) for k in self._SUMS]
                + [min(low) if low else math.nan, max(high) if high else math.nan]
            )
        if not rows:
            return
        values = torch.tensor(rows, dtype=torch.float64)  # [n, 8]
        if gather is not None:
            n = len(rows)
            ranks = gather(values.float()).double().cpu()
            ranks = ranks.view(-1, n, values.shape[1])  # [W, n, 8]
            values = ranks.sum(0)
            values[:, 6] = (
                torch.where(ranks[:, :, 6].isnan(), math.inf, ranks[:, :, 6]).min(0).values
            )
            values[:, 7] = (
                torch.where(ranks[:, :, 7].isnan(), -math.inf, ranks[:, :, 7]).max(0).values
            )
            values[:, 6][values[:, 6].isinf()] = math.nan
            values[:, 7][values[:, 7].isinf()] = math.nan
        for kl, entropy, low, high, region, tokens, low_min, high_max in values.tolist():
            tokens = max(tokens, 1.0)
            if self.beta != 0.0:
                metrics["kl"].append(kl / tokens)
            metrics["entropy"].append(entropy / tokens)
            metrics["clip_ratio/low_mean"].append(low / tokens)
            metrics["clip_ratio/high_mean"].append(high / tokens)
            metrics["clip_ratio/region_mean"].append(region / tokens)
            metrics["clip_ratio/low_min"].append(low_min)
            metrics["clip_ratio/high_max"].append(high_max)
