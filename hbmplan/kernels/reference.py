"""Pure-PyTorch references for every hbmplan kernel; they run on any device, CPU included.

The schedules use these when CUDA or Triton is absent, and the kernel tests compare against them.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from hbmplan.kernels.accumulate import accumulate_into
from hbmplan.kernels.filtered_linear import grad_mask

__all__ = [
    "check_varlen_inputs",
    "masked_linear_ref",
    "prefix_attention_ref",
    "prefix_attention_varlen_ref",
    "rms_norm_ref",
]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in the input's dtype: ``x * rsqrt(mean(x^2) + eps) * weight``.

    Args:
        x: [..., h] activations.
        weight: [h] scale.
    """
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def masked_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor
) -> torch.Tensor:
    """Reference of :func:`hbmplan.kernels.filtered_linear.filtered_linear`: ``F.linear`` whose
    output gradient is zeroed on the rows ``keep`` (bool, x's leading dims flattened) drops, so
    the backward's full-size GEMMs see zeros there.

    Args:
        x: [..., in]; weight: [out, in]; bias: [out] or ``None``; keep: bool [rows].
    """
    return grad_mask(F.linear(x, weight, bias), keep.view(*x.shape[:-1], 1))


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


def prefix_attention_varlen_ref(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    grad_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`hbmplan.kernels.prefix_attention` for packed sequences, in plain PyTorch.

    Query ``t`` of sequence ``n`` (tokens ``cu_seqlens[n]:cu_seqlens[n+1]``) sees every prompt key
    and its own sequence's keys up to itself. Each sequence runs :func:`prefix_attention_ref` once
    (one host sync reads ``cu_seqlens``); the prompt K/V are concatenated per sequence.

    Args:
        q: [T, Hq, D] queries of all packed sequences (post-RoPE), any float dtype.
        k_prefix, v_prefix: [Pp, Hkv, D] the prompt's keys/values, any strides.
        k, v: [T, Hkv, D] the sequences' own keys/values. ``Hq`` must be a multiple of ``Hkv``.
        cu_seqlens: int32 [N+1]: 0, strictly increasing, T.
        grad_cache: ``(gk, gv)`` [Pp, Hkv, D] float buffers; backward adds the prompt's dK/dV into
            them in place (for whichever of k_prefix, v_prefix requires grad), and k_prefix and
            v_prefix get no autograd gradient. The reference builds a prompt-sized gradient first.
            Either may be ``None``: that tensor's gradient is then ordinary (none when it does
            not require grad, as for a K/V that only frozen weights produced).
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        [T, Hq, D] in q's dtype.
    """
    # it reads cu_seqlens on the host anyway, so its values are checked wherever it lives
    check_varlen_inputs(q, k_prefix, v_prefix, k, v, cu_seqlens, grad_cache, check_values=True)
    if grad_cache is not None:
        gk, gv = grad_cache
        k_prefix = k_prefix if gk is None else accumulate_into(k_prefix, gk)
        v_prefix = v_prefix if gv is None else accumulate_into(v_prefix, gv)
    kp = k_prefix.transpose(0, 1).unsqueeze(0)  # [1, Hkv, Pp, D]
    vp = v_prefix.transpose(0, 1).unsqueeze(0)
    outs = []
    for lo, hi in itertools.pairwise(cu_seqlens.tolist()):
        row = [x[lo:hi].transpose(0, 1).unsqueeze(0) for x in (q, k, v)]  # [1, H, L, D]
        out = prefix_attention_ref(row[0], kp, vp, row[1], row[2], scale)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


def check_varlen_inputs(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    grad_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    check_values: bool | None = None,
) -> tuple[int, int, int, int, int, int]:
    """Validate packed prefix-attention inputs; return ``(N, T, Hq, Hkv, D, Pp)``.

    ``cu_seqlens`` values are checked if ``check_values``, by default when it is on the CPU (no
    host sync); otherwise only its dtype, shape and device.
    """
    for name, x in (("q", q), ("k_prefix", k_prefix), ("v_prefix", v_prefix), ("k", k), ("v", v)):
        if x.dim() != 3:
            raise ValueError(
                f"{name} must be 3-D [tokens, heads, head_dim], got shape {tuple(x.shape)}"
            )
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q must be a floating-point tensor, got {q.dtype}")
    total, hq, d = q.shape
    n_prefix, hkv, _ = k_prefix.shape
    if k.shape != (total, hkv, d):
        raise ValueError(
            f"k must be [T, Hkv, D] = {(total, hkv, d)} (T and D from q, Hkv from k_prefix), "
            f"got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k_prefix.shape[2] != d:
        raise ValueError(f"k_prefix head dim must equal q's {d}, got {k_prefix.shape[2]}")
    if v_prefix.shape != k_prefix.shape:
        raise ValueError(
            f"v_prefix must have k_prefix's shape {tuple(k_prefix.shape)}, got "
            f"{tuple(v_prefix.shape)}"
        )
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads must be a multiple of KV heads, got {hq} and {hkv}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device.type != "cpu" and cu_seqlens.device != q.device:
        raise ValueError(
            f"cu_seqlens must be on the CPU or q's device {q.device}, got {cu_seqlens.device}"
        )
    if check_values or (check_values is None and cu_seqlens.device.type == "cpu"):
        b = cu_seqlens.tolist()
        if b[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {b[0]}")
        bad = [n for n, (lo, hi) in enumerate(itertools.pairwise(b)) if hi <= lo]
        if bad:
            n = bad[0]
            raise ValueError(
                f"cu_seqlens must be strictly increasing (every sequence >= 1 token), got "
                f"cu_seqlens[{n}] = {b[n]} and cu_seqlens[{n + 1}] = {b[n + 1]}"
            )
        if b[-1] != total:
            raise ValueError(f"cu_seqlens must end at T = {total} (q's tokens), got {b[-1]}")
    if grad_cache is not None:
        if len(grad_cache) != 2:
            raise ValueError(f"grad_cache must be a pair (gk, gv), got {len(grad_cache)} items")
        for name, g in zip(("gk", "gv"), grad_cache, strict=True):
            if g is None:  # that prompt tensor's gradient, if any, is ordinary
                continue
            if g.shape != k_prefix.shape:
                raise ValueError(
                    f"grad_cache {name} must have k_prefix's shape {tuple(k_prefix.shape)}, got "
                    f"{tuple(g.shape)}"
                )
            if not g.dtype.is_floating_point or g.device != q.device:
                raise ValueError(
                    f"grad_cache {name} must be a float tensor on {q.device}, got {g.dtype} on "
                    f"{g.device}"
                )
            if g.stride(-1) != 1:
                raise ValueError(
                    f"grad_cache {name} must have a contiguous last dim (it is written in place), "
                    f"got strides {g.stride()}"
                )
    return cu_seqlens.numel() - 1, total, hq, hkv, d, n_prefix
