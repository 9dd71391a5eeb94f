"""Pure-PyTorch references for every hbmplan kernel; they run on any device, CPU included.

The schedules use these when CUDA or Triton is absent, and the kernel tests compare against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

__all__ = ["prefix_attention_ref", "rms_norm_ref"]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in the input's dtype: ``x * rsqrt(mean(x^2) + eps) * weight``.

    Args:
        x: [..., h] activations.
        weight: [h] scale.
    """
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def prefix_attention_ref(
    q: torch.Tensor,
    k_prefix: torch.Tensor | None,
    v_prefix: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of response rows over a shared prefix plus their own earlier tokens.

    Query ``t`` of a row sees every prefix key and the row's own keys ``0..t`` (bottom-right
    causal alignment). Rows are right-padded to a common length ``T``; a valid query never sees a
    padded key, so padding needs no mask.

    Args:
        q: [B, Hq, T, D] queries (post-RoPE).
        k_prefix, v_prefix: [1 or B, Hkv, Pp, D] shared prefix keys/values, or ``None`` for plain
            causal attention. Broadcast over rows without a copy until concatenation.
        k, v: [B, Hkv, T, D] the rows' own keys/values. ``Hq`` must be a multiple of ``Hkv``.
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        [B, Hq, T, D] attention output in ``q.dtype``.
    """
    B, Hq, T, _ = q.shape
    if Hq % k.shape[1] != 0:
        raise ValueError(f"query heads must be a multiple of KV heads, got {Hq} and {k.shape[1]}")
    if k_prefix is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    keys = torch.cat([k_prefix.expand(B, -1, -1, -1), k], dim=2)
    values = torch.cat([v_prefix.expand(B, -1, -1, -1), v], dim=2)
    S = keys.shape[2]
    if q.is_cuda:  # bottom-right causal bias: the efficient kernel, no [T, S] mask in memory
        bias = causal_lower_right(T, S)
    else:  # an explicit mask (CausalBias does not survive dispatch modes like FlopCounterMode)
        bias = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(
        q, keys, values, attn_mask=bias, scale=scale, enable_gqa=True
    )
