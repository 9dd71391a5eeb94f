"""The step's global token count across ranks, for a global token-mean loss (what TRL passes
as ``num_items_in_batch``).

    n = hbmplan.distributed.global_token_count(my_groups)
    loss_fn = lambda lp, group, i: -(adv[i] * lp).sum() / n * world_size

FSDP2 and DDP average gradients over ranks, so a loss divided by the global count is multiplied
by the world size to give the global token mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from hbmplan.distributed.agreement import collective_device
from hbmplan.group import Group

__all__ = ["global_token_count"]


def global_token_count(groups: Sequence[Group], group: dist.ProcessGroup | None = None) -> int:
    """Response tokens (the tokens whose log-probs the loss reads) of ``groups`` summed over
    every rank of ``group`` (one all-reduce; every rank calls it). Without an initialised
    process group: this process's count."""
    local = sum(sum(g.response_lens) for g in groups)
    if not (dist.is_available() and dist.is_initialized()):
        return local
    t = torch.tensor([local], dtype=torch.int64, device=collective_device(group))
    dist.all_reduce(t, group=group)
    return int(t.item())
