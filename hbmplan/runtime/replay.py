"""What replaying a decoder layer needs: the call it was made with (its hidden-state input left
out: the replay restarts from the layer's first saved tensor) and the RNG state at its start.

:class:`hbmplan.runtime.capture.SavedTensorCapture` keeps a :class:`LayerCall` for each layer
that may recompute, drops those layers' planned saved tensors after their forward (leaving a
:class:`Dropped` marker), and replays the layer at phase C's first unpack of one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hbmplan.allocator.views import TensorMeta

__all__ = ["Dropped", "LayerCall", "rng_state", "set_rng_state", "without_cache"]


@dataclass(frozen=True)
class Dropped:
    """Stands in the store for a saved tensor its layer's replay rebuilds."""

    layer: int
    meta: TensorMeta


@dataclass
class LayerCall:
    """How a decoder layer was called in the captured forward, minus its hidden-state input
    (rebuilt from the layer's first saved tensor, which equals it up to a cast)."""

    module: nn.Module
    args: tuple
    kwargs: dict
    x_dtype: torch.dtype
    rng: tuple[torch.Tensor, list[torch.Tensor]]
    replayable: bool = False


def without_cache(kwargs: dict) -> dict:
    """A layer's keyword arguments for its replay: no K/V cache (a replay must not append to
    it; with an empty cache the layer attends to the same keys)."""
    out = dict(kwargs)
    for name in ("cache", "past_key_values", "past_key_value", "layer_past"):
        if out.get(name) is not None:
            out[name] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def rng_state(device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The CPU generator's state, and the CUDA generator's of ``device`` if it is a GPU."""
    cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor]], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state(cuda[0], device)
