"""Adapter for Hugging Face causal LMs through their own cache interface; no model file is edited.

Phase A runs the base model over the prompt with a fresh ``DynamicCache``: each layer's cache
holds the post-RoPE K/V that attention consumed, inside the autograd graph. Phase B builds a new
cache per microbatch whose layers start from the K/V leaves; the model's own mask builder then
aligns response queries bottom-right against ``[prefix ; own]`` keys.

Packed rows: given a :class:`hbmplan.models.packed.PackedPrefix`, phase B runs one row of packed
responses without a cache. For that forward the model's attention implementation is switched to
``"hbmplan_prefix"``, registered in transformers' ``AttentionInterface`` (and absent from its mask
interface, so no mask is built): each layer's attention calls
:func:`hbmplan.kernels.prefix_attention` over the prompt K/V in place, with no per-row copy and no
GQA repeat. Layers with a sliding window shorter than the context cannot take this path.

Works with the ``past_key_values=`` keyword (transformers 5.x up to its rename) and ``cache=``
(newer releases): the keyword is looked up once from the base model's signature.

Mixture-of-experts families (:data:`MOE_MODEL_TYPES`) train with the router loss their own
``*ForCausalLM.forward`` adds: when ``config.output_router_logits`` is on and
``router_aux_loss_coef > 0``, ``coef * load_balancing_loss_func(router_logits, num_experts, top_k)``
over one forward (attention mask ``None``). The adapter reads the router logits the base model
records (``output_router_logits=True``), and :class:`RouterSpec` states that formula
("all-layers", softmax in the logits' dtype).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from hbmplan.models.adapter import AdapterBase
from hbmplan.models.moe import RouterSpec
from hbmplan.models.packed import KV, PrefixAttention
from hbmplan.models.tensor_parallel import check_tensor_parallel

__all__ = [
    "ATTENTION_NAME",
    "MOE_MODEL_TYPES",
    "SUPPORTED_MODEL_TYPES",
    "HFAdapter",
    "is_hf_model",
    "supported_text",
]


MOE_MODEL_TYPES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe"})
"""Mixture-of-experts families: top-k softmax routers whose auxiliary loss is transformers'
``load_balancing_loss_func`` over the router logits the base model records."""

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"}) | MOE_MODEL_TYPES
"""``config.model_type`` values whose attention reads K/V from the cache after RoPE, with no
per-position logit transform; each is covered by an fp64 equivalence test."""


def supported_text() -> str:
    """The supported families, for error messages."""
    dense = sorted(SUPPORTED_MODEL_TYPES - MOE_MODEL_TYPES)
    return f"{dense} and mixture-of-experts {sorted(MOE_MODEL_TYPES)}"


def is_hf_model(model: nn.Module) -> bool:
    """True for a ``transformers.PreTrainedModel`` (checked without importing transformers)."""
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "model_type") and hasattr(model, "get_decoder")


def _cache_keyword(base: nn.Module) -> str:
    params = inspect.signature(base.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ValueError(
        f"{type(base).__name__}.forward takes neither `cache` nor `past_key_values`; "
        "this transformers release is not supported"
    )


ATTENTION_NAME = "hbmplan_prefix"
"""The name hbmplan's packed prefix attention is registered under in ``AttentionInterface``."""


def packed_prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    hbmplan_prefix: PrefixAttention | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: the packed row's attention over the prompt K/V.

    Args:
        query: [1, Hq, T, D]; key, value: [1, Hkv, T, D] (the packed row's own, post-RoPE).
        hbmplan_prefix: the microbatch's prompt K/V and gradient cache (a forward keyword).

    Returns:
        ([1, T, Hq, D], None), as transformers' attention functions do.
    """
    if hbmplan_prefix is None:
        raise RuntimeError(
            f"attention implementation {ATTENTION_NAME!r} runs only inside hbmplan's reuse "
            "schedule, which passes hbmplan_prefix"
        )
    if attention_mask is not None:
        raise ValueError(f"{ATTENTION_NAME!r} builds its own causal structure; got a mask")
    if dropout:
        raise ValueError(f"attention dropout must be 0 for packed rows, got {dropout}")
    context = hbmplan_prefix.prefix_len + hbmplan_prefix.max_seqlen
    if sliding_window and sliding_window < context:
        raise ValueError(
            f"sliding window {sliding_window} is shorter than the context {context}: packed "
            "rows attend to the whole prompt"
        )
    rows = [x[0].transpose(0, 1) for x in (query, key, value)]  # [T, H, D] views
    out = hbmplan_prefix.layer(module.layer_idx).attend(*rows, scale=scaling)
    return out[None], None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, packed_prefix_attention)


class HFAdapter(AdapterBase):
    """Adapter for Hugging Face ``*ForCausalLM`` models of the supported families."""

    def __init__(self, model: nn.Module) -> None:
        model_type = model.config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported Hugging Face model_type {model_type!r}: hbmplan supports "
                f"{supported_text()}, and its own reference decoders"
            )
        from transformers import DynamicCache

        self._dynamic_cache = DynamicCache
        self.model = model
        self.config = model.config.get_text_config(decoder=True)
        self.base = model.get_decoder()
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise ValueError(f"{type(model).__name__} has no LM head (get_output_embeddings)")
        self._cache_kw = _cache_keyword(self.base)
        self.vocab_size = int(self.config.vocab_size)
        self.max_positions = getattr(self.config, "max_position_embeddings", None)
        self.num_layers = int(self.config.num_hidden_layers)
        self.head_dim = int(
            getattr(self.config, "head_dim", None)
            or self.config.hidden_size // self.config.num_attention_heads
        )
        self._moe = model_type in MOE_MODEL_TYPES

    @property
    def layers(self) -> nn.ModuleList:
        return self.base.layers

    @property
    def is_moe(self) -> bool:
        """A mixture-of-experts family (:data:`MOE_MODEL_TYPES`)."""
        return self._moe

    @property
    def router(self) -> RouterSpec | None:
        """The router loss the model's own forward would add, read from the live config (the
        coefficient as the ``*ForCausalLM`` holds it); ``None`` for dense families or when off."""
        cfg = self.config
        if not self._moe or not getattr(cfg, "output_router_logits", False):
            return None
        coef = getattr(self.model, "router_aux_loss_coef", getattr(cfg, "router_aux_loss_coef", 0))
        if float(coef) <= 0:
            return None
        experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
        return RouterSpec(
            num_experts=int(getattr(self.model, "num_experts", experts)),
            top_k=int(getattr(self.model, "num_experts_per_tok", cfg.num_experts_per_tok)),
            aux_coef=float(coef),
            load_balancing="all-layers",
            softmax_dtype="logits",
        )

    def check_schedulable(self) -> None:
        """``ValueError`` when the model's settings stop the reuse schedule: Hugging Face gradient
        checkpointing (in training mode) drops the K/V cache that phase A fills and phase B reads.
        hbmplan keeps or offloads the prompt's activations itself (``hbm_budget=``). A
        tensor-parallel layout it cannot run exactly raises :class:`hbmplan.ParallelLayoutError`
        (:mod:`hbmplan.models.tensor_parallel`)."""
        kv_heads = int(getattr(self.config, "num_key_value_heads", None) or 0) or int(
            self.config.num_attention_heads
        )
        check_tensor_parallel(
            self.model, self.layers, kv_heads, getattr(self.model, "_tp_plan", None)
        )
        checkpointed = [
            i
            for i, layer in enumerate(self.layers)
            if getattr(layer, "gradient_checkpointing", False) and layer.training
        ]
        if checkpointed:
            raise ValueError(
                f"Hugging Face gradient checkpointing must be off for the reuse schedule (it drops "
                f"the K/V cache phase A fills), got it on in {len(checkpointed)} of "
                f"{self.num_layers} layers: turn it off (model.activation_checkpointing_disable(), "
                "or gradient_checkpointing_disable() on older transformers) and give "
                "hbmplan.memory an hbm_budget to offload prompt activations instead"
            )

    def sliding_window(self) -> int | None:
        """The shortest sliding window any layer applies, ``None`` when all attend fully. A layer's
        attention module states its own (Qwen2/Qwen3 families); otherwise the config's applies
        (Mistral, Mixtral). 0 or ``None`` means no window (Qwen2-MoE writes 0 when it is off)."""
        default = getattr(self.config, "sliding_window", None)
        windows = [getattr(layer.self_attn, "sliding_window", default) for layer in self.layers]
        windows = [w for w in windows if w]
        return min(windows) if windows else None

    def packed_unsupported(self, context_len: int) -> str | None:
        """Packed rows attend to the whole prompt: refused when a layer's sliding window is
        shorter than ``context_len`` (prompt plus the longest response row)."""
        window = self.sliding_window()
        if window is not None and window < context_len:
            return (
                f"{self.config.model_type} has a sliding window of {window} tokens, shorter than "
                f"the context {context_len}"
            )
        return None

    @contextlib.contextmanager
    def _packed_attention(self):
        config = self.base.config
        previous = config._attn_implementation
        _register_attention()
        config._attn_implementation = ATTENTION_NAME
        try:
            yield
        finally:
            config._attn_implementation = previous

    def _run(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache,
        router_logits: list[torch.Tensor] | None = None,
        packed: PrefixAttention | None = None,
    ) -> torch.Tensor:
        kwargs = {self._cache_kw: cache, "use_cache": cache is not None}
        if router_logits is not None:
            kwargs["output_router_logits"] = True
        if packed is not None:
            with self._packed_attention():
                out = self.base(
                    input_ids=ids, position_ids=positions, hbmplan_prefix=packed, **kwargs
                )
        else:
            out = self.base(input_ids=ids, position_ids=positions, **kwargs)
        if router_logits is not None:
            router_logits.extend(out.router_logits)
        return out.last_hidden_state

    def prompt_kv(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        router_logits: list[torch.Tensor] | None = None,
        attention: PrefixAttention | None = None,
    ) -> list[KV]:
        """``attention``: the prompt's own attention runs through it (one packed row, as phase B's
        packed rows do; context parallel's prompt slice) instead of the model's causal mask."""
        # No config: plain full-attention layers that keep every prompt position (a sliding-window
        # layer type would crop the cache; the mask builder still applies the window).
        cache = self._dynamic_cache()
        self._run(ids, positions, cache, router_logits, packed=attention)
        kvs = [(layer.keys, layer.values) for layer in cache.layers]
        if len(kvs) != self.num_layers:
            raise ValueError(
                f"expected one cache layer per decoder layer ({self.num_layers}), got {len(kvs)}"
            )
        return kvs

    def response_hidden(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        prefix_kv: list[KV] | PrefixAttention,
        router_logits: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if isinstance(prefix_kv, PrefixAttention):
            if prefix_kv.num_layers != self.num_layers:
                raise ValueError(
                    f"prefix_kv must hold one (k, v) per layer ({self.num_layers}), got "
                    f"{prefix_kv.num_layers}"
                )
            return self._run(ids, positions, None, router_logits, packed=prefix_kv)
        B = ids.shape[0]
        cache = self._dynamic_cache()
        for i, (k, v) in enumerate(prefix_kv):
            cache.update(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), i)
        return self._run(ids, positions, cache, router_logits)

    def full_hidden(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        router_logits: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return self._run(ids, positions, None, router_logits)

    @property
    def lm_head(self) -> nn.Module:
        """The output embedding (an ``nn.Linear`` for the supported families; the schedules'
        chunked log-probs read its weight)."""
        return self.head

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)
