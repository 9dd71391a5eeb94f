"""All-or-nothing gradient accumulation for one step.

`GradStash` moves every parameter's ``.grad`` aside before a step, so the step accumulates into
fresh gradients. On success the two are summed (in place, into the stashed tensor); on failure the
fresh ones are dropped and the stashed ones put back, ``None`` staying ``None``.

Memory: nothing extra when ``.grad`` is ``None`` at the start of the step (the usual
``zero_grad(set_to_none=True)`` loop). When gradients are already being accumulated across steps,
the step's fresh gradients are one extra gradient-sized buffer until the merge.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["GradStash"]


class GradStash:
    """Stash ``.grad`` of ``params`` now; then either :meth:`merge` or :meth:`restore`."""

    def __init__(self, params: Iterable[torch.nn.Parameter]) -> None:
        self._params = [p for p in params if p.requires_grad]
        self._saved: list[torch.Tensor | None] = []
        for p in self._params:
            self._saved.append(p.grad)
            p.grad = None

    def merge(self) -> None:
        """The step succeeded: ``.grad = stashed + fresh``."""
        for p, saved in zip(self._params, self._saved, strict=True):
            if saved is None:
                continue
            if p.grad is not None:
                saved.add_(p.grad)
            p.grad = saved
        self._saved = []

    def restore(self) -> None:
        """The step failed: put back exactly the gradients from before it."""
        for p, saved in zip(self._params, self._saved, strict=True):
            p.grad = saved
        self._saved = []
