"""hbmplan's own Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Pure PyTorch, any size and dtype. The demo, the tests and the benchmarks use it; it exposes the
prompt's per-layer K/V directly, so the reuse schedule needs no cache object for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hbmplan.kernels.reference import prefix_attention_ref, rms_norm_ref
from hbmplan.models.packed import KV, LayerAttention, PrefixAttention

__all__ = ["DecoderConfig", "ReferenceDecoder"]


def check_decoder_shape(cfg, extra_positive: tuple[str, ...] = ()) -> None:
    """The shape rules every hbmplan decoder config obeys; ``ValueError`` naming the field."""
    names = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads")
    for name in names + extra_positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_heads % cfg.num_kv_heads != 0:
        raise ValueError(
            f"num_heads must be a multiple of num_kv_heads, got {cfg.num_heads} and "
            f"{cfg.num_kv_heads}"
        )
    if cfg.head_dim is None and cfg.hidden_size % cfg.num_heads != 0:
        raise ValueError(
            f"hidden_size must be divisible by num_heads when head_dim is unset, got "
            f"{cfg.hidden_size} and {cfg.num_heads}"
        )
    if cfg.dim % 2 != 0:
        raise ValueError(f"head_dim must be even for RoPE, got {cfg.dim}")


@dataclass(frozen=True)
class DecoderConfig:
    """Shape of a :class:`ReferenceDecoder`."""

    vocab_size: int = 32000
    """Number of token ids."""
    hidden_size: int = 4096
    """Model width h."""
    num_layers: int = 32
    """Decoder layers L."""
    num_heads: int = 32
    """Query heads Hq."""
    num_kv_heads: int = 8
    """Key/value heads Hkv; Hq must be a multiple (grouped-query attention)."""
    head_dim: int | None = None
    """Per-head width D; default h / Hq."""
    intermediate_size: int = 14336
    """SwiGLU inner width."""
    max_positions: int = 131072
    """Longest sequence (prompt + response) the model accepts."""
    rope_theta: float = 500000.0
    """RoPE base."""
    rms_eps: float = 1e-5
    """RMSNorm epsilon."""

    def __post_init__(self) -> None:
        check_decoder_shape(self, ("intermediate_size",))

    @property
    def dim(self) -> int:
        """Resolved head dimension D."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, h: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_ref(x, self.weight, self.eps)


def rope_tables(
    positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, 1, T, D] for positions [B, T].

    Angles are computed in fp64 and rounded once to ``dtype``, so a position gets the same table
    whichever sequence (prompt or response microbatch) it appears in.
    """
    inv_freq = 1.0 / theta ** (
        torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim
    )
    angles = positions.to(torch.float64)[:, None, :, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Llama convention). x: [B, H, T, D]; cos, sin: [B, 1, T, D]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _heads(x: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., H * dim] -> [..., H, dim]; H from the width, so that under tensor parallel a rank's
    local heads work (and T = 0 tokens, which a -1 cannot resolve)."""
    return x.view(*x.shape[:-1], x.shape[-1] // dim, dim)


class SelfAttention(nn.Module):
    """Grouped-query self-attention with RoPE, optionally over a shared prefix K/V."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        h, D = cfg.hidden_size, cfg.dim
        self.heads, self.kv_heads, self.dim = cfg.num_heads, cfg.num_kv_heads, D
        self.q_proj = nn.Linear(h, cfg.num_heads * D, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * D, h, bias=False)

    def forward(
        self,
        a: torch.Tensor,
        rope_cs: tuple[torch.Tensor, torch.Tensor],
        prefix: KV | LayerAttention | None,
    ) -> tuple[torch.Tensor, KV]:
        """a: normed input [B, T, h]. Returns (output [B, T, h], post-RoPE (k, v) [B, Hkv, T, D]).

        ``prefix``: ``None`` (plain causal), a shared (k, v) [1 or B, Hkv, Pp, D] every row
        attends to, or a :class:`PackedLayer` (B = 1 row of packed sequences, attention through
        :func:`hbmplan.kernels.prefix_attention`)."""
        if isinstance(prefix, LayerAttention):
            return self._packed(a, rope_cs, prefix)
        B, T, _ = a.shape
        D = self.dim
        q = _heads(self.q_proj(a), D).transpose(1, 2)
        k = _heads(self.k_proj(a), D).transpose(1, 2)
        v = _heads(self.v_proj(a), D).transpose(1, 2)
        q, k = rope(q, *rope_cs), rope(k, *rope_cs)
        kp, vp = prefix if prefix is not None else (None, None)
        o = prefix_attention_ref(q, kp, vp, k, v)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, o.shape[1] * D)), (k, v)

    def _packed(
        self, a: torch.Tensor, rope_cs: tuple[torch.Tensor, torch.Tensor], prefix: LayerAttention
    ) -> tuple[torch.Tensor, KV]:
        B, T, _ = a.shape
        if B != 1:
            raise ValueError(f"packed sequences come as one row, got {B} rows")
        D = self.dim
        cos, sin = (t[0].transpose(0, 1) for t in rope_cs)  # [T, 1, D]
        q = rope(_heads(self.q_proj(a)[0], D), cos, sin)
        k = rope(_heads(self.k_proj(a)[0], D), cos, sin)
        v = _heads(self.v_proj(a)[0], D)
        o = prefix.attend(q, k, v)
        kv = (k.transpose(0, 1)[None], v.transpose(0, 1)[None])
        return self.o_proj(o.reshape(1, T, o.shape[1] * D)), kv


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.attn_norm = RMSNorm(h, cfg.rms_eps)
        self.attn = SelfAttention(cfg)
        self.mlp_norm = RMSNorm(h, cfg.rms_eps)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope_cs: tuple[torch.Tensor, torch.Tensor],
        prefix: KV | LayerAttention | None,
    ) -> tuple[torch.Tensor, KV]:
        o, kv = self.attn(self.attn_norm(x), rope_cs, prefix)
        x = x + o
        m = self.mlp_norm(x)
        x = x + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))
        return x, kv


def layer_prefixes(
    prefix_kv: list[KV] | PrefixAttention | None, num_layers: int
) -> list[KV | LayerAttention | None]:
    """Each layer's ``prefix`` argument from a decoder's ``prefix_kv``; ``ValueError`` unless it
    covers exactly ``num_layers`` layers."""
    if prefix_kv is None:
        return [None] * num_layers
    count = prefix_kv.num_layers if isinstance(prefix_kv, PrefixAttention) else len(prefix_kv)
    if count != num_layers:
        raise ValueError(f"prefix_kv must hold one (k, v) per layer ({num_layers}), got {count}")
    if isinstance(prefix_kv, PrefixAttention):
        return [prefix_kv.layer(i) for i in range(num_layers)]
    return list(prefix_kv)


@torch.no_grad()
def init_weights(model: nn.Module, num_layers: int, residual: tuple[str, ...], std: float) -> None:
    """Normal(0, std) weights, RMSNorm scales at one, the residual-stream projections named by
    ``residual`` (name suffixes) scaled by 1/sqrt(2L)."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        elif name.endswith(residual):
            p.normal_(0.0, std / (2 * num_layers) ** 0.5)
        else:
            p.normal_(0.0, std)


class ReferenceDecoder(nn.Module):
    """A Llama-style causal LM.

    ``forward(ids, positions, prefix_kv=None)`` returns the final hidden states [B, T, h] and the
    per-layer K/V ``[(k, v)]``, each [B, Hkv, T, D] post-RoPE. With ``prefix_kv`` (one (k, v)
    pair per layer, [1 or B, Hkv, Pp, D]) every row also attends to that shared prefix; with a
    :class:`hbmplan.models.packed.PackedPrefix` the single row [1, T] holds packed sequences
    that attend to its prompt K/V through :func:`hbmplan.kernels.prefix_attention`.
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) weights, RMSNorm scales at one, residual projections scaled by 1/sqrt(2L)."""
        init_weights(self, self.cfg.num_layers, ("o_proj.weight", "down_proj.weight"), std)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        prefix_kv: list[KV] | PrefixAttention | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """ids, positions: [B, T] int64. Returns (hidden [B, T, h], per-layer K/V)."""
        prefixes = layer_prefixes(prefix_kv, len(self.layers))
        x = self.embed(ids)
        rope_cs = rope_tables(positions, self.cfg.dim, self.cfg.rope_theta, x.dtype)
        kvs: list[KV] = []
        for layer, prefix in zip(self.layers, prefixes, strict=True):
            x, kv = layer(x, rope_cs, prefix)
            kvs.append(kv)
        return self.norm(x), kvs
