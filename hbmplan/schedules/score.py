"""Per-token log-probs of responses without gradients, the prompt run once per group: the
no-grad passes of an RL trainer (old policy, reference model) on the reuse schedule's rows.

For each group the model runs ``p[:-1]`` once (phase A without a graph) and then the rows
``[p[-1]; r_i[:-1]]`` at positions ``P-1..`` over its K/V, right-padded, several per microbatch
up to ``tokens_per_microbatch``, exactly as phase B runs them; nothing is kept between groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hbmplan.group import Group, validate_groups
from hbmplan.models.adapter import CausalLMAdapter, adapt, model_device
from hbmplan.schedules.microbatch import pack_rows, padded_rows, response_logprobs

__all__ = ["score_groups"]


@torch.no_grad()
def score_groups(
    model: nn.Module | CausalLMAdapter,
    groups: Sequence[Group],
    *,
    temperature: float = 1.0,
    tokens_per_microbatch: int | None = None,
    entropy: bool = False,
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]] | None]:
    """Log-probs (and optionally entropies) of every response token, without gradients.

    Args:
        model: a supported causal LM or adapter (as for :func:`hbmplan.schedules.reuse_step`).
        groups: the groups; ``group.data`` is not read.
        temperature: the logits are divided by it before the log-softmax.
        tokens_per_microbatch: padded tokens (rows x longest row) per response microbatch;
            ``None``: one response per microbatch.
        entropy: also return each token's entropy of the temperature-scaled distribution.

    Returns:
        ``(logprobs, entropies)``: per group, per response, a tensor [S_i] (float32; float64 for
        an fp64 model); ``entropies`` is ``None`` unless asked for.
    """
    if not groups:
        return [], ([] if entropy else None)
    adapter = adapt(model)
    validate_groups(groups, adapter.vocab_size, adapter.max_positions, model_device(adapter))
    logprobs: list[list[torch.Tensor]] = []
    entropies: list[list[torch.Tensor]] | None = [] if entropy else None
    for group in groups:
        n = group.prompt_len - 1
        positions = torch.arange(n, device=group.prompt.device)[None]
        kv = adapter.prompt_kv(group.prompt[None, :-1], positions)
        out: list[torch.Tensor | None] = [None] * group.group_size
        ent: list[torch.Tensor | None] = [None] * group.group_size
        lengths = [r.numel() for r in group.responses]
        for indices in pack_rows(lengths, tokens_per_microbatch):
            targets = [group.responses[i] for i in indices]
            seqs = [torch.cat([group.prompt[-1:], t[:-1]]) for t in targets]
            ids, pos = padded_rows(seqs, n)
            hidden = adapter.response_hidden(ids, pos, kv)
            h: list[torch.Tensor] | None = [] if entropy else None
            lps = response_logprobs(adapter, hidden, [0] * len(seqs), targets, temperature, h)
            for k, i in enumerate(indices):
                out[i] = lps[k]
                if h is not None:
                    ent[i] = h[k]
        del kv
        logprobs.append(out)  # type: ignore[arg-type]
        if entropies is not None:
            entropies.append(ent)  # type: ignore[arg-type]
    return logprobs, entropies
