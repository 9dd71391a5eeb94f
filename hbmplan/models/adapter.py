"""The narrow interface the schedules need from a causal LM, and `adapt()` to obtain it.

A schedule never calls a model directly: it asks an adapter for the prompt's per-layer K/V (phase
A), for hidden states of response rows that attend to K/V leaves (phase B), for hidden states of
whole trajectories (the dense baseline), and for LM-head logits on chosen positions.

Beside those, :class:`CausalLMAdapter` declares optional capabilities, each with a default in
:class:`AdapterBase` that an adapter overrides when it has the capability:

* ``packed_unsupported(context_len) -> str | None``: ``None`` when phase B may run one row of
  packed responses (``response_hidden`` then takes a :class:`hbmplan.models.packed.PackedPrefix`
  and attention reads the prompt K/V in place through :func:`hbmplan.kernels.prefix_attention`);
  else why not. The default: no packed path (padded rows).
* ``head_dim``: D, which the prefix-attention kernel needs (default ``None``: unknown).
* ``lm_head``: an ``nn.Linear`` whose output ``logits`` returns as is; log-probs over a large
  vocabulary are then computed in chunks (:mod:`hbmplan.kernels.logprobs`). Default ``None``.
* ``is_moe`` / ``router``: a mixture-of-experts model, and the :class:`RouterSpec` of the router
  loss it trains with (``None`` when off). Its three forward methods then take a keyword
  ``router_logits``: a list the forward appends each router layer's logits to.
* ``check_schedulable()``: raise when the model's current settings stop the reuse schedule
  (Hugging Face gradient checkpointing). Default: nothing to check.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from hbmplan.models.moe import MoEDecoder, RouterSpec
from hbmplan.models.packed import KV, PackedPrefix, PrefixAttention
from hbmplan.models.reference import ReferenceDecoder
from hbmplan.models.tensor_parallel import check_tensor_parallel

__all__ = [
    "KV",
    "AdapterBase",
    "CausalLMAdapter",
    "MoEAdapter",
    "ReferenceAdapter",
    "adapt",
    "model_device",
    "model_dtype",
]


@runtime_checkable
class CausalLMAdapter(Protocol):
    """What the schedules need from a model. Implementations never edit the model; the optional
    capabilities (see the module docstring) have defaults in :class:`AdapterBase`."""

    model: nn.Module
    vocab_size: int
    max_positions: int | None
    num_layers: int
    head_dim: int | None
    """D; ``None`` when unknown (the prefix-attention kernel then does not run)."""
    is_moe: bool
    """The model routes tokens to experts (whatever its router loss)."""

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order (used to attribute saved tensors to a layer)."""
        ...

    @property
    def router(self) -> RouterSpec | None:
        """The router loss the model trains with; ``None`` for dense models or when off."""
        ...

    @property
    def lm_head(self) -> nn.Module | None:
        """The LM head whose output :meth:`logits` returns as is, or ``None``."""
        ...

    def prompt_kv(self, ids: torch.Tensor, positions: torch.Tensor) -> list[KV]:
        """Run the shared prompt; return each layer's post-RoPE (k, v) [1, Hkv, P', D] in graph."""
        ...

    def response_hidden(
        self, ids: torch.Tensor, positions: torch.Tensor, prefix_kv: list[KV] | PackedPrefix
    ) -> torch.Tensor:
        """Hidden states [B, T, h] of right-padded rows ids/positions [B, T] that attend to the
        shared ``prefix_kv`` ([1, Hkv, P', D] per layer) and to their own earlier tokens (or, for
        an adapter that packs, of one packed row [1, T] given a ``PackedPrefix``)."""
        ...

    def full_hidden(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, h] of right-padded causal rows (the dense baseline)."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits [N, V] for hidden states [N, h]."""
        ...

    def packed_unsupported(self, context_len: int) -> str | None:
        """Why phase B cannot run packed rows over ``context_len`` keys (prompt plus the longest
        response row), or ``None`` when it can."""
        ...

    def check_schedulable(self) -> None:
        """Raise ``ValueError`` if the model's current settings stop the reuse schedule."""
        ...


class AdapterBase:
    """Defaults of the optional capabilities of :class:`CausalLMAdapter`: no packed rows, no
    known head dim, no chunkable LM head, a dense model, nothing to check."""

    head_dim: int | None = None
    is_moe: bool = False

    @property
    def router(self) -> RouterSpec | None:
        return None

    @property
    def lm_head(self) -> nn.Module | None:
        return None

    def packed_unsupported(self, context_len: int) -> str | None:
        return f"{type(self).__name__} has no packed-row path (packed_unsupported)"

    def check_schedulable(self) -> None:
        return None


class ReferenceAdapter(AdapterBase):
    """Adapter for :class:`hbmplan.models.ReferenceDecoder`."""

    def __init__(self, model: ReferenceDecoder | MoEDecoder) -> None:
        self.model = model
        self.vocab_size = model.cfg.vocab_size
        self.max_positions = model.cfg.max_positions
        self.num_layers = model.cfg.num_layers
        self.head_dim = model.cfg.dim

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def prompt_kv(
        self, ids: torch.Tensor, positions: torch.Tensor, attention: PrefixAttention | None = None
    ) -> list[KV]:
        """``attention``: run the prompt's own attention through it (one packed row; context
        parallel's prompt slice), instead of plain causal attention."""
        _, kvs = self.model(ids, positions, prefix_kv=attention)
        return kvs

    def response_hidden(
        self, ids: torch.Tensor, positions: torch.Tensor, prefix_kv: list[KV] | PackedPrefix
    ) -> torch.Tensor:
        hidden, _ = self.model(ids, positions, prefix_kv=prefix_kv)
        return hidden

    def packed_unsupported(self, context_len: int) -> str | None:
        """The reference decoders attend over any context in packed rows."""
        return None

    def check_schedulable(self) -> None:
        """A tensor-parallel layout the step cannot run exactly raises
        :class:`hbmplan.ParallelLayoutError` (:mod:`hbmplan.models.tensor_parallel`)."""
        check_tensor_parallel(self.model, self.layers, self.model.cfg.num_kv_heads)

    def full_hidden(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.model(ids, positions)
        return hidden

    @property
    def lm_head(self) -> nn.Linear:
        """The LM head (chunked log-probs read its weight directly)."""
        return self.model.lm_head

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)


class MoEAdapter(ReferenceAdapter):
    """Adapter for :class:`hbmplan.models.MoEDecoder`: the reference adapter, plus the router
    logits of each forward appended to ``router_logits`` when a list is given."""

    is_moe = True

    @property
    def router(self) -> RouterSpec | None:
        """The configured router loss; ``None`` when both coefficients are 0."""
        spec = self.model.cfg.router_spec()
        return spec if spec.aux_coef > 0 or spec.z_coef > 0 else None

    def _run(self, ids, positions, prefix_kv, router_logits):
        hidden, kvs, logits = self.model(ids, positions, prefix_kv=prefix_kv)
        if router_logits is not None:
            router_logits.extend(logits)
        return hidden, kvs

    def prompt_kv(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        router_logits: list[torch.Tensor] | None = None,
    ) -> list[KV]:
        return self._run(ids, positions, None, router_logits)[1]

    def response_hidden(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        prefix_kv: list[KV] | PackedPrefix,
        router_logits: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return self._run(ids, positions, prefix_kv, router_logits)[0]

    def full_hidden(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        router_logits: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return self._run(ids, positions, None, router_logits)[0]


def adapt(model: nn.Module | CausalLMAdapter) -> CausalLMAdapter:
    """Return the adapter for ``model``: hbmplan's reference decoders or a supported Hugging Face
    causal LM (see :data:`hbmplan.models.hf.SUPPORTED_MODEL_TYPES`). An adapter passes through.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or adapter.
        ValueError: the model family is not supported (the message lists what is).
    """
    if isinstance(model, ReferenceAdapter) or (
        not isinstance(model, nn.Module) and isinstance(model, CausalLMAdapter)
    ):
        return model
    if isinstance(model, ReferenceDecoder):
        return ReferenceAdapter(model)
    if isinstance(model, MoEDecoder):
        return MoEAdapter(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from hbmplan.models.hf import HFAdapter, is_hf_model

    if is_hf_model(model):
        return HFAdapter(model)
    from hbmplan.models.hf import supported_text

    raise ValueError(
        f"unsupported model {type(model).__name__}: hbmplan supports its ReferenceDecoder, "
        f"MoEDecoder and Hugging Face causal LMs of model_type {supported_text()}"
    )


def model_device(adapter: CausalLMAdapter) -> torch.device:
    """The device of the model's first parameter (hbmplan runs single-device models)."""
    for p in adapter.model.parameters():
        return p.device
    raise ValueError(f"{type(adapter.model).__name__} has no parameters")


def model_dtype(adapter: CausalLMAdapter) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (its K/V dtype)."""
    for p in adapter.model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    raise ValueError(f"{type(adapter.model).__name__} has no floating-point parameters")
