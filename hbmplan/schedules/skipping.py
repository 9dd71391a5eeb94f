"""Exact skipping: what a loss declares carries no gradient is never run.

A loss callable may have two optional methods (their names are part of the contract):

* ``inert(group, i) -> bool``: response ``i``'s loss has gradient exactly zero with respect to
  its log-probs, whatever they are (a GRPO response with advantage 0 and no KL term).
* ``loss_extent(group, i) -> int``: only the first ``n`` tokens carry loss weight: the loss's
  gradient with respect to ``logprobs[n:]`` is exactly zero (a masked tail). ``loss_fn`` still
  receives ``[S_i]`` log-probs, the dropped tail as detached zeros, so it must not let the
  tail's *values* change the loss of the other tokens either.

Both schedules then leave out, before anything runs: inert responses (no forward, no backward,
no gK/gV), groups whose responses are all inert (no phase A or C either), and tokens past a
response's extent. A response's tokens never influence an earlier token (causal attention), so
what remains computes the same gradients: bitwise with one response per microbatch and no
dropped tail (the skipped backward would have added exact zeros), to rounding when packing or a
dropped tail changes the GEMM shapes. Skipped responses' loss values are not in
``StepStats.loss``.

Nothing is skipped while a mixture-of-experts router loss is on (a response then still has a
router gradient), with ``skip_inert=False``, or for a loss without the methods. The
declarations are the loss's contract: ``check_skips=True`` runs everything and raises
``ValueError`` where a declaration is false (a debug mode; it skips nothing).
"""

from __future__ import annotations

from collections.abc import Sequence

from hbmplan.group import Group
from hbmplan.runtime.stats import SkipStats

__all__ = ["declared_extents", "skip_stats"]


def _extent(loss_fn: object, group: Group, i: int) -> int:
    S = group.response_lens[i]
    inert = getattr(loss_fn, "inert", None)
    if inert is not None:
        flag = inert(group, i)
        if not isinstance(flag, bool):
            raise TypeError(f"loss_fn.inert must return a bool, got {type(flag).__name__}")
        if flag:
            return 0
    extent = getattr(loss_fn, "loss_extent", None)
    if extent is None:
        return S
    n = extent(group, i)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= S:
        raise ValueError(
            f"loss_fn.loss_extent must return an int in [0, {S}] for response {i}, got {n!r}"
        )
    return n


def declared_extents(loss_fn: object, groups: Sequence[Group]) -> list[tuple[int, ...]] | None:
    """Per group, per response: the leading tokens that carry loss weight (0: inert), or
    ``None`` when ``loss_fn`` declares nothing (no ``inert``, no ``loss_extent``). Raises
    ``TypeError``/``ValueError`` for a malformed declaration, before anything runs."""
    if not (hasattr(loss_fn, "inert") or hasattr(loss_fn, "loss_extent")):
        return None
    return [tuple(_extent(loss_fn, g, i) for i in range(g.group_size)) for g in groups]


def skip_stats(groups: Sequence[Group], extents: Sequence[Sequence[int]]) -> SkipStats:
    """What running only ``extents`` of ``groups`` leaves out."""
    responses = skipped_groups = tokens = 0
    shapes = []
    for g, ext in zip(groups, extents, strict=True):
        lens = g.response_lens
        responses += sum(e == 0 for e in ext)
        skipped_groups += not any(ext)
        tokens += sum(s - e for s, e in zip(lens, ext, strict=True))
        if tuple(ext) != tuple(lens):
            shapes.append((g.prompt_len, tuple(lens), tuple(ext)))
    return SkipStats(responses, skipped_groups, tokens, tuple(shapes))
