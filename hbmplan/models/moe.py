"""hbmplan's reference mixture-of-experts decoder and the description of a router loss.

:class:`MoEDecoder` is the reference decoder's attention with a top-k softmax router and SwiGLU
experts in place of the MLP; it returns each layer's router logits so that the schedules can
compute the router losses a dense trainer would (see :mod:`hbmplan.schedules.router`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from hbmplan.models.packed import KV, PackedLayer, PackedPrefix
from hbmplan.models.reference import (
    RMSNorm,
    SelfAttention,
    check_decoder_shape,
    init_weights,
    layer_prefixes,
    rope_tables,
)

__all__ = ["MoEConfig", "MoEDecoder", "RouterSpec"]


LoadBalancing = Literal["per-layer", "all-layers"]


@dataclass(frozen=True)
class RouterSpec:
    """What a model's router loss is, for a schedule to reproduce it from router logits.

    For a token set of ``n`` tokens and router layer ``l``: ``c[l, e]`` counts the (token, slot)
    pairs routed to expert ``e`` by top-k of the router probabilities (a constant), ``s[l, e]``
    sums the router probability of ``e`` over the tokens (differentiable) and ``z[l]`` sums the
    squared logsumexp of the router logits.
    """

    num_experts: int
    """Experts per router layer, N_E."""
    top_k: int
    """Experts each token is routed to, k."""
    aux_coef: float
    """Coefficient of the load-balancing loss added to the training loss."""
    z_coef: float = 0.0
    """Coefficient of the router z-loss ``sum_l z[l] / n`` (ST-MoE); 0 turns it off."""
    load_balancing: LoadBalancing = "per-layer"
    """"per-layer": ``sum_l N_E sum_e (c[l,e] / (k n)) (s[l,e] / n)`` (Switch Transformer per
    layer, summed over layers; 1 per layer when balanced). "all-layers": transformers'
    ``load_balancing_loss_func``, one term over every layer's tokens concatenated:
    ``N_E sum_e (sum_l c[l,e] / (L n)) (sum_l s[l,e] / (L n))`` (no 1/k: k when balanced)."""
    softmax_dtype: Literal["logits", "fp32"] = "fp32"
    """Dtype of the router softmax whose top-k gives the counts: "logits" as the logits are
    (what transformers' loss does), "fp32" at least float32 (the reference MoE's routing)."""

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must lie in [1, num_experts={self.num_experts}], got {self.top_k}"
            )
        for name in ("aux_coef", "z_coef"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if self.load_balancing not in ("per-layer", "all-layers"):
            raise ValueError(
                f"load_balancing must be 'per-layer' or 'all-layers', got {self.load_balancing!r}"
            )
        if self.softmax_dtype not in ("logits", "fp32"):
            raise ValueError(
                f"softmax_dtype must be 'logits' or 'fp32', got {self.softmax_dtype!r}"
            )


@dataclass(frozen=True)
class MoEConfig:
    """Shape and router loss of a :class:`MoEDecoder` (defaults: Qwen3-30B-A3B's shape)."""

    vocab_size: int = 151936
    """Number of token ids."""
    hidden_size: int = 2048
    """Model width h."""
    num_layers: int = 48
    """Decoder layers L; every layer is a MoE layer."""
    num_heads: int = 32
    """Query heads Hq."""
    num_kv_heads: int = 4
    """Key/value heads Hkv; Hq must be a multiple."""
    head_dim: int | None = 128
    """Per-head width D; ``None``: h / Hq."""
    num_experts: int = 128
    """Experts per layer N_E."""
    top_k: int = 8
    """Experts per token k."""
    expert_intermediate_size: int = 768
    """SwiGLU inner width of one expert."""
    norm_topk_prob: bool = True
    """Renormalise the k selected router probabilities to sum to one before weighting."""
    router_aux_loss_coef: float = 0.001
    """Load-balancing loss coefficient; with ``router_z_loss_coef`` both 0 the loss is off."""
    router_z_loss_coef: float = 0.0
    """Router z-loss coefficient (mean over tokens of logsumexp(logits)^2, summed over layers)."""
    load_balancing: LoadBalancing = "per-layer"
    """Which load-balancing formula; see :attr:`RouterSpec.load_balancing`."""
    max_positions: int = 131072
    """Longest sequence (prompt + response) the model accepts."""
    rope_theta: float = 1000000.0
    """RoPE base."""
    rms_eps: float = 1e-6
    """RMSNorm epsilon."""

    def __post_init__(self) -> None:
        check_decoder_shape(self, ("expert_intermediate_size",))
        self.router_spec()  # validates the expert counts, coefficients and formula

    @property
    def dim(self) -> int:
        """Resolved head dimension D."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def router_spec(self) -> RouterSpec:
        """The router loss this configuration trains with."""
        return RouterSpec(
            num_experts=self.num_experts,
            top_k=self.top_k,
            aux_coef=self.router_aux_loss_coef,
            z_coef=self.router_z_loss_coef,
            load_balancing=self.load_balancing,
            softmax_dtype="fp32",
        )


def router_probs(logits: torch.Tensor, softmax_dtype: Literal["logits", "fp32"]) -> torch.Tensor:
    """Router probabilities [..., E] from logits [..., E]: softmax in the logits' dtype
    ("logits") or in at least float32 ("fp32")."""
    if softmax_dtype == "fp32" and logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return logits.softmax(-1)


class MoEBlock(nn.Module):
    """Top-k softmax router over ``num_experts`` SwiGLU experts (weights as [E, ., .] tensors).

    ``dispatched`` counts the (token, expert) pairs the experts have computed since construction:
    every token of every row, padding included, counts k per forward.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        h, inner, E = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts
        self.cfg = cfg
        self.router = nn.Linear(h, E, bias=False)
        self.w_gate = nn.Parameter(torch.empty(E, inner, h))
        self.w_up = nn.Parameter(torch.empty(E, inner, h))
        self.w_down = nn.Parameter(torch.empty(E, h, inner))
        self.dispatched = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, h]. Returns (output [B, T, h], router logits [B, T, E] in x's dtype)."""
        B, T, h = x.shape
        flat = x.reshape(B * T, h)
        logits = self.router(flat)
        weights, experts = router_probs(logits, "fp32").topk(self.cfg.top_k, dim=-1)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        for e in range(self.cfg.num_experts):
            token, slot = torch.where(experts == e)
            if token.numel() == 0:
                continue
            xe = flat[token]
            ye = F.linear(F.silu(F.linear(xe, self.w_gate[e])) * F.linear(xe, self.w_up[e]),
                          self.w_down[e])  # fmt: skip
            out = out.index_add(0, token, ye * weights[token, slot, None])
            self.dispatched += token.numel()
        return out.view(B, T, h), logits.view(B, T, -1)


class MoELayer(nn.Module):
    """Pre-norm attention (as :class:`hbmplan.models.ReferenceDecoder`) and a MoE block."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = SelfAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.moe = MoEBlock(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope_cs: tuple[torch.Tensor, torch.Tensor],
        prefix: KV | PackedLayer | None,
    ) -> tuple[torch.Tensor, KV, torch.Tensor]:
        o, kv = self.attn(self.attn_norm(x), rope_cs, prefix)
        x = x + o
        y, logits = self.moe(self.mlp_norm(x))
        return x + y, kv, logits


class MoEDecoder(nn.Module):
    """A causal LM with a mixture-of-experts MLP in every layer.

    ``forward(ids, positions, prefix_kv=None)`` returns the final hidden states [B, T, h], the
    per-layer post-RoPE K/V ``[(k, v)]`` ([B, Hkv, T, D] each) and the per-layer router logits
    ``[B, T, E]`` (in the model's dtype). ``prefix_kv`` works as in
    :class:`hbmplan.models.ReferenceDecoder`. The router loss the model trains with is
    ``cfg.router_spec()``; ``dispatched`` counts (token, expert) pairs over all layers.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoELayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @property
    def dispatched(self) -> int:
        """(token, expert) pairs the experts computed, all layers, since construction."""
        return sum(layer.moe.dispatched for layer in self.layers)

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) weights, RMSNorm scales at one, residual projections scaled by 1/sqrt(2L)."""
        init_weights(self, self.cfg.num_layers, ("o_proj.weight", "w_down"), std)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        prefix_kv: list[KV] | PackedPrefix | None = None,
    ) -> tuple[torch.Tensor, list[KV], list[torch.Tensor]]:
        """ids, positions: [B, T] int64. Returns (hidden [B, T, h], per-layer K/V, per-layer
        router logits [B, T, E])."""
        prefixes = layer_prefixes(prefix_kv, len(self.layers))
        x = self.embed(ids)
        rope_cs = rope_tables(positions, self.cfg.dim, self.cfg.rope_theta, x.dtype)
        kvs: list[KV] = []
        logits: list[torch.Tensor] = []
        for layer, prefix in zip(self.layers, prefixes, strict=True):
            x, kv, lg = layer(x, rope_cs, prefix)
            kvs.append(kv)
            logits.append(lg)
        return self.norm(x), kvs, logits
