"""TRL's padded GRPO batches as hbmplan groups, and the generation batch regrouped so that each
prompt's rows train together, each row keeping the loss weight TRL gives it.

A TRL batch is a dict of tensors with one row per completion: ``prompt_ids``/``prompt_mask``
[B, P] (left-padded), ``completion_ids``/``completion_mask`` [B, C] (right-padded), per-row
``advantages`` [B], optional per-token ``old_per_token_logps``, ``ref_per_token_logps``,
``importance_sampling_ratio`` ([B, C] or [B, 1]) and ``tool_mask``, and the scalar
``num_items_in_batch``. Regrouping adds two columns: ``hbmplan_weight`` [B] (the row's factor in
TRL's loss, gradient accumulation included) and ``hbmplan_batch`` [B] (the index of the TRL
micro-batch whose logged metrics the row belongs to).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hbmplan.group import Group

__all__ = [
    "BATCH",
    "WEIGHT",
    "GroupedRows",
    "group_rows",
    "regroup",
    "row_weights",
    "take_rows",
]

WEIGHT = "hbmplan_weight"
BATCH = "hbmplan_batch"


def row_weights(
    mask: torch.Tensor,
    loss_type: str,
    *,
    accumulation: int,
    steps_per_generation: int,
    num_items_in_batch: torch.Tensor,
    max_completion_length: int,
    num_processes: int = 1,
) -> torch.Tensor:
    """Each row's factor in TRL 1.16's ``_compute_loss`` of one micro-batch: the loss is
    ``sum_r weight_r * sum_t mask_rt * loss_rt``. float32 [b].

    Args:
        mask: [b, C] the micro-batch's loss mask (completion mask x tool mask).
        loss_type: "grpo" (each row's token mean, mean over rows), "bnpo" (the micro-batch's
            token mean), "dr_grpo" (sum / (b x max_completion_length)), "dapo" (sum / the
            generation batch's tokens, rescaled to one accumulation window).
        accumulation: gradient accumulation steps; steps_per_generation, num_items_in_batch,
            max_completion_length, num_processes: as TRL reads them.
    """
    b = mask.shape[0]
    m = mask.float()
    if loss_type == "grpo":
        return 1.0 / (m.sum(-1).clamp(min=1.0) * b * accumulation)
    if loss_type == "bnpo":
        return (1.0 / (m.sum().clamp(min=1.0) * accumulation)).expand(b).clone()
    if loss_type == "dr_grpo":
        return torch.full((b,), 1.0 / (b * max_completion_length * accumulation), device=m.device)
    if loss_type == "dapo":
        normalizer = num_items_in_batch.float().clamp(min=1.0) / num_processes
        normalizer = normalizer * accumulation / steps_per_generation
        return (1.0 / normalizer).to(m.device).expand(b).clone()
    raise ValueError(f"loss_type must be one of grpo, bnpo, dr_grpo, dapo, got {loss_type!r}")


def loss_mask(batch: dict[str, Any]) -> torch.Tensor:
    """TRL's loss mask: the completion mask, times the tool mask when there is one."""
    mask = batch["completion_mask"]
    return mask * batch["tool_mask"] if batch.get("tool_mask") is not None else mask


def take_rows(batch: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """The rows ``index`` of every per-row value (tensors with a first dimension, lists); scalars
    and ``None`` as they are."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            out[key] = value[index.to(value.device)]
        elif isinstance(value, list):
            out[key] = [value[i] for i in index.tolist()]
        else:
            out[key] = value
    return out


def _prompt_keys(batch: dict[str, Any]) -> list[bytes]:
    ids, mask = batch["prompt_ids"].cpu(), batch["prompt_mask"].cpu().bool()
    return [ids[r][mask[r]].numpy().tobytes() for r in range(ids.shape[0])]


def regroup(
    batch: dict[str, Any],
    steps_per_generation: int,
    weights: Callable[[dict[str, Any]], torch.Tensor],
    exact: bool,
) -> list[dict[str, Any]]:
    """Split a shuffled generation batch into ``steps_per_generation`` micro-batches of whole
    prompt groups.

    TRL splits the shuffled rows into equal consecutive micro-batches, scattering each prompt's
    rows. Here the groups, in order of their first row, go to consecutive micro-batches (as
    evenly as whole groups allow; a micro-batch may be empty when there are fewer groups). With
    ``exact`` (the whole generation batch lies in one optimizer step) each row's weight and
    metric batch come from the micro-batch TRL's split put it in, so the step's update is TRL's;
    otherwise from the micro-batch it trains in (TRL fed the same grouping trains the same).

    Args:
        batch: the shuffled generation batch (see the module docstring).
        weights: ``weights(micro_batch) -> [b]`` (:func:`row_weights` with the trainer's settings).
    """
    n = batch["prompt_ids"].shape[0]
    chunk = n // steps_per_generation
    keys = _prompt_keys(batch)
    order: dict[bytes, list[int]] = {}
    for r, k in enumerate(keys):
        order.setdefault(k, []).append(r)
    groups = list(order.values())
    parts: list[list[int]] = [[] for _ in range(steps_per_generation)]
    for g, rows in enumerate(groups):
        parts[g * steps_per_generation // len(groups)].extend(rows)
    device = batch["prompt_ids"].device
    weight = torch.empty(n, device=device)
    metric = torch.empty(n, dtype=torch.long, device=device)
    split = (
        [list(range(j * chunk, (j + 1) * chunk)) for j in range(steps_per_generation)]
        if exact
        else parts
    )
    for j, rows in enumerate(split):
        index = torch.tensor(rows, dtype=torch.long, device=device)
        if rows:
            weight[index] = weights(take_rows(batch, index)).to(weight.dtype)
        metric[index] = j
    full = {**batch, WEIGHT: weight, BATCH: metric}
    return [take_rows(full, torch.tensor(rows, dtype=torch.long)) for rows in parts]


@dataclass
class GroupedRows:
    """A TRL batch's rows as hbmplan groups: ``groups[g].responses[i]`` is row ``rows[g][i]``'s
    completion up to its last loss-carrying token; rows whose completion mask is all zero (a
    truncated completion TRL masks out) carry no loss and are left out (``skipped``)."""

    groups: list[Group]
    rows: list[list[int]]
    skipped: list[int]


def group_rows(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> GroupedRows:
    """Rows with the same prompt (its unpadded tokens) as one group, in order of first row.

    Args:
        prompt_ids, prompt_mask: [B, P] left-padded prompts.
        completion_ids, completion_mask: [B, C] right-padded completions.
    """
    C = completion_ids.shape[1]
    ends = torch.where(
        completion_mask > 0, torch.arange(1, C + 1, device=completion_mask.device), 0
    ).amax(-1)
    ends = ends.tolist() if C else [0] * completion_ids.shape[0]
    keys = _prompt_keys({"prompt_ids": prompt_ids, "prompt_mask": prompt_mask})
    index: dict[bytes, int] = {}
    prompts: list[torch.Tensor] = []
    responses: list[list[torch.Tensor]] = []
    rows: list[list[int]] = []
    skipped = []
    for r, key in enumerate(keys):
        if ends[r] == 0:
            skipped.append(r)
            continue
        if key not in index:
            index[key] = len(prompts)
            prompts.append(prompt_ids[r][prompt_mask[r].bool()])
            responses.append([])
            rows.append([])
        g = index[key]
        responses[g].append(completion_ids[r, : ends[r]])
        rows[g].append(r)
    groups = [Group(p, rs) for p, rs in zip(prompts, responses, strict=True)]
    return GroupedRows(groups, rows, skipped)
