"""Attention of packed response tokens over a shared prompt K/V plus their own earlier tokens.

Triton kernels (forward, dQ, dK/dV for the responses' keys, dK/dV for the prompt's keys), their
launcher and the autograd.Function. The backward adds the prompt's dK/dV straight into an fp32
gradient cache, so no prompt-sized gradient is allocated per call.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from hbmplan.kernels import launch
from hbmplan.kernels.reference import check_varlen_inputs, prefix_attention_varlen_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference serves every call
    triton = None

__all__ = ["kernel_rejects", "prefix_attention", "triton_unsupported"]

Impl = Literal["auto", "triton", "reference"]
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def prefix_attention(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    grad_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    impl: Impl = "auto",
    deterministic: bool = False,
) -> torch.Tensor:
    """Packed responses attending to a shared prompt K/V and their own earlier tokens.

    Query ``t`` of sequence ``n`` (tokens ``cu_seqlens[n]:cu_seqlens[n+1]``) sees all ``Pp``
    prompt keys and its own sequence's keys up to itself: bottom-right causal over
    ``[prompt; own]``. Query head ``h`` reads KV head ``h // (Hq // Hkv)``; K/V are never repeated.

    Args:
        q: [T, Hq, D] queries of all packed sequences (post-RoPE); bf16, fp16 or fp32 for Triton,
            any float dtype for the reference.
        k_prefix, v_prefix: [Pp, Hkv, D] the prompt's keys/values, same dtype. Any strides with
            the last one 1: a schedule's [1, Hkv, Pp, D] tensor enters as ``x[0].transpose(0, 1)``.
        k, v: [T, Hkv, D] the sequences' own keys/values.
        cu_seqlens: int32 [N+1] sequence boundaries: 0, strictly increasing, T. On the CPU its
            values are checked (and it is copied to the device without a sync); on the device the
            Triton path trusts it, since checking would cost a host sync per call.
        grad_cache: ``(gk, gv)`` fp32 [Pp, Hkv, D] (any strides with the last one 1; the
            schedule's [1, Hkv, Pp, D] buffers as ``g[0].transpose(0, 1)``). Backward *adds* the
            prompt's dK/dV into them in place (for each of k_prefix, v_prefix that requires grad)
            and returns ``None`` as their autograd gradients. Without it the gradients are ordinary.
            Either entry may be ``None``: that tensor's gradient is then ordinary, and none is
            computed when it does not require grad (a K/V only frozen weights produced); when
            neither requires grad the prompt dK/dV kernel does not run.
        scale: softmax scale, default ``D ** -0.5``.
        impl: ``"triton"``, ``"reference"`` (:func:`prefix_attention_varlen_ref`), or ``"auto"``:
            Triton when q is on CUDA, Triton imports, D is 64 or 128, the dtype is 16/32-bit and
            the cache (if any) is fp32; otherwise the reference.
        deterministic: add the prompt's dK/dV without atomics (one program per prompt key tile
            and KV head loops over every query), so the Triton backward is bitwise
            reproducible. Costs nothing while those ``ceil(Pp / 128) * Hkv`` programs fill half
            the SMs (on a 132-SM H100: Pp > 1024 at Hkv=8, Pp > 4224 at Hkv=2); below, the
            default splits their query loops and deterministic mode forgoes that, so the
            prompt dK/dV kernel takes up to ``SMs // programs`` times longer (4x at Pp=512,
            Hkv=8). The reference ignores it.

    Returns:
        [T, Hq, D] in q's dtype.
    """
    dims = check_varlen_inputs(q, k_prefix, v_prefix, k, v, cu_seqlens, grad_cache)
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if impl == "auto":
        use_triton = q.is_cuda and _triton_unsupported(q, grad_cache) is None
    else:
        use_triton = impl == "triton"
    if use_triton:
        reason = _triton_unsupported(q, grad_cache)
        if reason is not None:
            error, message = reason
            raise error(f"impl='triton' cannot run this call: {message}")
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return _PrefixAttention.apply(
            q, k_prefix, v_prefix, k, v, cu_seqlens, grad_cache, scale, deterministic, dims
        )
    return prefix_attention_varlen_ref(
        q, k_prefix, v_prefix, k, v, cu_seqlens, grad_cache=grad_cache, scale=scale
    )


def kernel_rejects(
    dtype: torch.dtype, head_dim: int, cache_dtype: torch.dtype | None = None
) -> str | None:
    """The shape and dtype rule the Triton kernel breaks for these properties (a message naming
    the rule and the value), or ``None``; what the machine has is :func:`triton_unsupported`'s."""
    if head_dim not in launch.SUPPORTED_HEAD_DIMS:
        return f"head dim must be one of {launch.SUPPORTED_HEAD_DIMS}, got {head_dim}"
    if dtype not in _TRITON_DTYPES:
        return f"dtype must be bf16, fp16 or fp32, got {dtype}"
    if cache_dtype is not None and cache_dtype != torch.float32:
        return f"grad_cache must be float32 for Triton, got {cache_dtype}"
    return None


def triton_unsupported(
    device: torch.device | str,
    dtype: torch.dtype,
    head_dim: int,
    cache_dtype: torch.dtype | None = None,
) -> tuple[type[Exception], str] | None:
    """Why the Triton kernel cannot take a call with these properties (the error type to raise and
    a message naming the rule and the value), or ``None`` when it can.

    Args:
        device: where q lives.
        dtype: the dtype of q and the K/V.
        head_dim: D.
        cache_dtype: the gradient cache's dtype, ``None`` without a cache.
    """
    backend = launch.detect()
    if not backend.triton or triton is None:
        return RuntimeError, "the triton package is not installed"
    rule = kernel_rejects(dtype, head_dim, cache_dtype)
    if rule is not None:
        return ValueError, rule
    if torch.device(device).type != "cuda" and not backend.interpret:
        return RuntimeError, (
            f"tensors are on {device}; Triton runs CPU tensors only in its interpreter: set "
            "TRITON_INTERPRET=1 before torch/Triton is first imported"
        )
    return None


def _triton_unsupported(q: torch.Tensor, grad_cache) -> tuple[type[Exception], str] | None:
    cache_dtype = None
    if grad_cache is not None:
        dtypes = [g.dtype for g in grad_cache if g is not None]
        cache_dtype = next((d for d in dtypes if d != torch.float32), dtypes[0] if dtypes else None)
    return triton_unsupported(q.device, q.dtype, q.shape[-1], cache_dtype)


# ---------------------------------------------------------------------------------------------
# Kernels. Layouts: every tensor is [rows, heads, D] with D contiguous; LSE and DELTA are fp32
# [Hq, T]. A query/key tile of a sequence is found from cu_seqlens inside the kernel (a cumsum
# over the per-sequence tile counts), so launching needs no host sync and no tile table.
# Scores are kept in base 2: s2 = (q . k) * scale * log2(e), LSE2 = max + log2(sum).
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _tile_of(
        CU, slot, n_seqs, BLOCK: tl.constexpr, MAX_SEQS: tl.constexpr, SCAN_ABOVE: tl.constexpr
    ):
        # Program `slot` owns tile number `slot` in the list of all sequences' BLOCK-row tiles:
        # (tile start, sequence start, sequence end); start >= end marks a spare program, since
        # the grid is an upper bound (T / BLOCK + N) on the tile count.
        seq = tl.arange(0, MAX_SEQS)
        lo = tl.load(CU + seq, mask=seq < n_seqs, other=0)
        hi = tl.load(CU + seq + 1, mask=seq < n_seqs, other=0)
        tiles = (hi - lo + BLOCK - 1) // BLOCK
        if MAX_SEQS <= SCAN_ABOVE:  # inclusive prefix sum as a masked [N, N] sum: few ops
            end = tl.sum(tl.where(seq[None, :] <= seq[:, None], tiles[None, :], 0), 1)
        else:
            end = tl.cumsum(tiles, 0)
        mine = (slot >= end - tiles) & (slot < end)
        start = tl.sum(tl.where(mine, lo + (slot - end + tiles) * BLOCK, 0), 0)
        seq_lo = tl.sum(tl.where(mine, lo, 0), 0)
        seq_hi = tl.sum(tl.where(mine, hi, 0), 0)
        return start, seq_lo, seq_hi

    @triton.jit
    def _key_phase(
        PHASE: tl.constexpr, KP, VP, K, V, hk, skp_t, skp_h, svp_t, svp_h, sk_t, sk_h, sv_t, sv_h,
        n_prefix, seq_lo, start, seq_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # The keys a query tile [start, start + BLOCK_M) of sequence [seq_lo, seq_hi) reads, in
        # four phases: 0 whole prompt tiles, 1 the prompt's partial last tile, 2 own keys before
        # the query tile, 3 own keys on the diagonal. Phases 0 and 2 need no mask.
        # Returns (K base, V base, K row stride, V row stride, first key, end key).
        if PHASE < 2:
            k_base = KP + hk * skp_h
            v_base = VP + hk * svp_h
            s_k = skp_t
            s_v = svp_t
        else:
            k_base = K + hk * sk_h
            v_base = V + hk * sv_h
            s_k = sk_t
            s_v = sv_t
        prefix_full = (n_prefix // BLOCK_N) * BLOCK_N
        if PHASE == 0:
            n_lo = 0
            n_hi = prefix_full
        elif PHASE == 1:
            n_lo = prefix_full
            n_hi = n_prefix
        elif PHASE == 2:
            n_lo = seq_lo
            n_hi = start
        else:
            n_lo = start
            n_hi = tl.minimum(start + BLOCK_M, seq_hi)
        return k_base, v_base, s_k, s_v, n_lo, n_hi

    @triton.jit
    def _fwd_kernel(
        Q, KP, VP, K, V, OUT, LSE, CU,
        sq_t, sq_h, skp_t, skp_h, svp_t, svp_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
        n_seqs, n_prefix, total, qk_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, MAX_SEQS: tl.constexpr, SCAN_ABOVE: tl.constexpr,
        PREC: tl.constexpr,
    ):  # fmt: skip
        # one program per (query tile of a sequence, query head)
        h = tl.program_id(1)
        hk = h // GROUP
        start, seq_lo, seq_hi = _tile_of(
            CU, tl.program_id(0), n_seqs, BLOCK_M, MAX_SEQS, SCAN_ABOVE
        )
        if start >= seq_hi:
            return
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < seq_hi
        rows64 = rows[:, None].to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + h * sq_h + rows64 * sq_t + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for phase in tl.static_range(4):
            k_base, v_base, s_k, s_v, n_lo, n_hi = _key_phase(
                phase, KP, VP, K, V, hk, skp_t, skp_h, svp_t, svp_h, sk_t, sk_h, sv_t, sv_h,
                n_prefix, seq_lo, start, seq_hi, BLOCK_M, BLOCK_N,
            )  # fmt: skip
            for n0 in range(n_lo, n_hi, BLOCK_N):
                cols = n0 + offs_n
                k_ptrs = k_base + cols[:, None].to(tl.int64) * s_k + offs_d[None, :]
                v_ptrs = v_base + cols[:, None].to(tl.int64) * s_v + offs_d[None, :]
                if phase % 2 == 0:
                    kt = tl.load(k_ptrs)
                    vt = tl.load(v_ptrs)
                else:
                    col_ok = cols < n_hi
                    kt = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
                    vt = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
                s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
                if phase == 1:
                    s = tl.where(col_ok[None, :], s, float("-inf"))
                if phase == 3:
                    causal = col_ok[None, :] & (cols[None, :] <= rows[:, None])
                    s = tl.where(causal, s, float("-inf"))
                # no row is ever fully masked: phase 1 sees key n0, phase 3 key `start`, and the
                # first tile a row reads has one of them, so m_new is finite
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
                m_i = m_new
        tl.store(
            OUT + h * so_h + rows64 * so_t + offs_d[None, :],
            (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=row_ok[:, None],
        )  # fmt: skip
        tl.store(LSE + h.to(tl.int64) * total + rows, m_i + tl.log2(l_i), mask=row_ok)

    @triton.jit
    def _dq_kernel(
        Q, KP, VP, K, V, OUT, DO, DQ, LSE, DELTA, CU,
        sq_t, sq_h, skp_t, skp_h, svp_t, svp_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
        sdo_t, sdo_h, sdq_t, sdq_h,
        n_seqs, n_prefix, total, qk_scale, sm_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, MAX_SEQS: tl.constexpr, SCAN_ABOVE: tl.constexpr,
        PREC: tl.constexpr,
    ):  # fmt: skip
        # the forward's structure: one program per (query tile, query head), same key phases
        h = tl.program_id(1)
        hk = h // GROUP
        start, seq_lo, seq_hi = _tile_of(
            CU, tl.program_id(0), n_seqs, BLOCK_M, MAX_SEQS, SCAN_ABOVE
        )
        if start >= seq_hi:
            return
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < seq_hi
        rows64 = rows[:, None].to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_mask = row_ok[:, None]
        q = tl.load(Q + h * sq_h + rows64 * sq_t + offs_d[None, :], mask=row_mask, other=0.0)
        do = tl.load(DO + h * sdo_h + rows64 * sdo_t + offs_d[None, :], mask=row_mask, other=0.0)
        o = tl.load(OUT + h * so_h + rows64 * so_t + offs_d[None, :], mask=row_mask, other=0.0)
        # rowsum(dO * O), which the dK/dV kernels read after this one
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + h.to(tl.int64) * total + rows, delta, mask=row_ok)
        lse = tl.load(LSE + h.to(tl.int64) * total + rows, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for phase in tl.static_range(4):
            k_base, v_base, s_k, s_v, n_lo, n_hi = _key_phase(
                phase, KP, VP, K, V, hk, skp_t, skp_h, svp_t, svp_h, sk_t, sk_h, sv_t, sv_h,
                n_prefix, seq_lo, start, seq_hi, BLOCK_M, BLOCK_N,
            )  # fmt: skip
            for n0 in range(n_lo, n_hi, BLOCK_N):
                cols = n0 + offs_n
                k_ptrs = k_base + cols[:, None].to(tl.int64) * s_k + offs_d[None, :]
                v_ptrs = v_base + cols[:, None].to(tl.int64) * s_v + offs_d[None, :]
                if phase % 2 == 0:
                    kt = tl.load(k_ptrs)
                    vt = tl.load(v_ptrs)
                else:
                    col_ok = cols < n_hi
                    kt = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
                    vt = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
                p = tl.exp2(tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale - lse[:, None])
                if phase == 1:
                    p = tl.where(col_ok[None, :], p, 0.0)
                if phase == 3:
                    p = tl.where(col_ok[None, :] & (cols[None, :] <= rows[:, None]), p, 0.0)
                ds = p * (tl.dot(do, tl.trans(vt), input_precision=PREC) - delta[:, None])
                dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)
        tl.store(
            DQ + h * sdq_h + rows64 * sdq_t + offs_d[None, :],
            (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_mask,
        )  # fmt: skip

    @triton.jit
    def _dkdv_tile(
        kt, vt, dk, dv, Q, DO, LSE, DELTA, h, m0, m_end, cols, sq_t, sq_h, sdo_t, sdo_h, total,
        qk_scale, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
        PREC: tl.constexpr,
    ):  # fmt: skip
        # One query tile [m0, m0 + BLOCK_M) of head h (rows >= m_end masked) against a key tile:
        # accumulate its dK (unscaled) and dV. LSE = +inf on masked rows makes their P exactly 0.
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < m_end
        rows64 = rows[:, None].to(tl.int64)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + h * sq_h + rows64 * sq_t + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(
            DO + h * sdo_h + rows64 * sdo_t + offs_d[None, :], mask=row_ok[:, None], other=0.0
        )
        lse = tl.load(LSE + h.to(tl.int64) * total + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + h.to(tl.int64) * total + rows, mask=row_ok, other=0.0)
        pt = tl.exp2(
            tl.dot(kt, tl.trans(q), input_precision=PREC) * qk_scale - lse[None, :]
        )  # [keys, queries]
        if CAUSAL:
            pt = tl.where(cols[:, None] <= rows[None, :], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dst = pt * (tl.dot(vt, tl.trans(do), input_precision=PREC) - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
        return dk, dv

    @triton.jit
    def _dkdv_own_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, CU,
        sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdk_t, sdk_h, sdv_t, sdv_h,
        n_seqs, total, qk_scale, sm_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, MAX_SEQS: tl.constexpr, SCAN_ABOVE: tl.constexpr,
        PREC: tl.constexpr,
    ):  # fmt: skip
        # one program per (key tile of a sequence, KV head): only the same sequence's later
        # queries, of the GROUP query heads, see these keys, so the program owns their dK/dV rows
        hk = tl.program_id(1)
        start, _, seq_hi = _tile_of(CU, tl.program_id(0), n_seqs, BLOCK_N, MAX_SEQS, SCAN_ABOVE)
        if start >= seq_hi:
            return
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = (cols < seq_hi)[:, None]
        cols64 = cols[:, None].to(tl.int64)
        offs_d = tl.arange(0, HEAD_DIM)
        kt = tl.load(K + hk * sk_h + cols64 * sk_t + offs_d[None, :], mask=col_mask, other=0.0)
        vt = tl.load(V + hk * sv_h + cols64 * sv_t + offs_d[None, :], mask=col_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        # query tiles overlapping the key tile need the causal mask; later ones do not
        diag_end = start + ((BLOCK_N + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        for g in range(GROUP):
            h = hk * GROUP + g
            for m0 in range(start, tl.minimum(diag_end, seq_hi), BLOCK_M):
                dk, dv = _dkdv_tile(
                    kt, vt, dk, dv, Q, DO, LSE, DELTA, h, m0, seq_hi, cols, sq_t, sq_h, sdo_t,
                    sdo_h, total, qk_scale, True, HEAD_DIM, BLOCK_M, PREC,
                )  # fmt: skip
            for m0 in range(diag_end, seq_hi, BLOCK_M):
                dk, dv = _dkdv_tile(
                    kt, vt, dk, dv, Q, DO, LSE, DELTA, h, m0, seq_hi, cols, sq_t, sq_h, sdo_t,
                    sdo_h, total, qk_scale, False, HEAD_DIM, BLOCK_M, PREC,
                )  # fmt: skip
        tl.store(
            DK + hk * sdk_h + cols64 * sdk_t + offs_d[None, :],
            (dk * sm_scale).to(DK.dtype.element_ty), mask=col_mask,
        )  # fmt: skip
        tl.store(
            DV + hk * sdv_h + cols64 * sdv_t + offs_d[None, :],
            dv.to(DV.dtype.element_ty), mask=col_mask,
        )  # fmt: skip

    @triton.jit
    def _dkdv_prefix_kernel(
        Q, KP, VP, DO, GK, GV, LSE, DELTA,
        sq_t, sq_h, skp_t, skp_h, svp_t, svp_h, sdo_t, sdo_h, sgk_t, sgk_h, sgv_t, sgv_h,
        n_prefix, total, qk_scale, sm_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr, WRITE_K: tl.constexpr,
        WRITE_V: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        # one program per (prompt key tile, KV head, query range): every query of every sequence
        # sees every prompt key, so the query loop is one flat, unmasked-by-causality range
        hk = tl.program_id(1)
        part = tl.program_id(2)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = (cols < n_prefix)[:, None]
        cols64 = cols[:, None].to(tl.int64)
        offs_d = tl.arange(0, HEAD_DIM)
        kt = tl.load(KP + hk * skp_h + cols64 * skp_t + offs_d[None, :], mask=col_mask, other=0.0)
        vt = tl.load(VP + hk * svp_h + cols64 * svp_t + offs_d[None, :], mask=col_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        per_part = tl.cdiv(tl.cdiv(total, BLOCK_M), tl.num_programs(2)) * BLOCK_M
        m_lo = part * per_part
        m_hi = tl.minimum(m_lo + per_part, total)
        for g in range(GROUP):
            for m0 in range(m_lo, m_hi, BLOCK_M):
                dk, dv = _dkdv_tile(
                    kt, vt, dk, dv, Q, DO, LSE, DELTA, hk * GROUP + g, m0, total, cols, sq_t,
                    sq_h, sdo_t, sdo_h, total, qk_scale, False, HEAD_DIM, BLOCK_M, PREC,
                )  # fmt: skip
        dk = dk * sm_scale
        gk_ptrs = GK + hk * sgk_h + cols64 * sgk_t + offs_d[None, :]
        gv_ptrs = GV + hk * sgv_h + cols64 * sgv_t + offs_d[None, :]
        if ATOMIC:  # query ranges split over programs: their partial sums meet in the cache
            if WRITE_K:
                tl.atomic_add(gk_ptrs, dk, mask=col_mask)
            if WRITE_V:
                tl.atomic_add(gv_ptrs, dv, mask=col_mask)
        else:  # this program alone owns these cache rows: read-add-write, deterministic
            if WRITE_K:
                tl.store(gk_ptrs, tl.load(gk_ptrs, mask=col_mask) + dk, mask=col_mask)
            if WRITE_V:
                tl.store(gv_ptrs, tl.load(gv_ptrs, mask=col_mask) + dv, mask=col_mask)


# ---------------------------------------------------------------------------------------------
# Launcher and autograd
# ---------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634


def _st(x: torch.Tensor) -> tuple[int, int]:
    """(row stride, head stride) of a [rows, heads, D] tensor with D contiguous."""
    return x.stride(0), x.stride(1)


def _d_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# Up to this many packed sequences (rounded up to a power of two) a kernel finds its tile with an
# [N, N] masked sum; beyond, with a scan. A module constant so that a test can move it.
_SCAN_ABOVE = 64


def _max_seqs(n: int) -> int:
    # a power of two for tl.arange; at least 16 so that N <= 16 share one compiled variant
    return max(16, triton.next_power_of_2(n))


def _device_of(x: torch.Tensor):
    # Triton launches on the current device: make it x's
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32: exact fp32 products, not TF32, so fp32 results stay comparable to a reference
    return "ieee" if dtype == torch.float32 else "tf32"


class _PrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q, k_prefix, v_prefix, k, v, cu_seqlens, grad_cache, scale, deterministic, dims
    ):
        n_seqs, total, hq, hkv, d, n_prefix = dims
        q, k, v = _d_contiguous(q), _d_contiguous(k), _d_contiguous(v)
        k_prefix, v_prefix = _d_contiguous(k_prefix), _d_contiguous(v_prefix)
        cu = cu_seqlens.to(q.device, non_blocking=True)
        cfg = launch.attention_configs(d, q.dtype).fwd
        assert cfg.block_m % cfg.block_n == 0, (
            "own keys before a query tile come in whole key tiles"
        )
        out = torch.empty(total, hq, d, dtype=q.dtype, device=q.device)
        lse = torch.empty(hq, total, dtype=torch.float32, device=q.device)
        grid = (triton.cdiv(total, cfg.block_m) + n_seqs, hq)
        with _device_of(q):
            _fwd_kernel[grid](
                q, k_prefix, v_prefix, k, v, out, lse, cu,
                *_st(q), *_st(k_prefix), *_st(v_prefix), *_st(k), *_st(v), *_st(out),
                n_seqs, n_prefix, total, scale * _LOG2E,
                GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                MAX_SEQS=_max_seqs(n_seqs), SCAN_ABOVE=_SCAN_ABOVE, PREC=_dot_precision(q.dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
        ctx.save_for_backward(q, k_prefix, v_prefix, k, v, cu, out, lse)
        ctx.grad_cache = grad_cache
        ctx.scale = scale
        ctx.deterministic = deterministic
        ctx.dims = dims
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        with _device_of(dout):
            return _backward(ctx, dout)


def _backward(ctx, dout):
    """dQ (and delta = rowsum(dO * O)), then the responses' dK/dV, then the prompt's dK/dV added
    into the cache (or a fresh fp32 buffer)."""
    q, k_prefix, v_prefix, k, v, cu, out, lse = ctx.saved_tensors
    n_seqs, total, hq, hkv, d, n_prefix = ctx.dims
    need_q, need_kp, need_vp, need_k, need_v = ctx.needs_input_grad[:5]
    dout = _d_contiguous(dout)
    cfgs = launch.attention_configs(d, q.dtype)
    common = dict(GROUP=hq // hkv, HEAD_DIM=d, PREC=_dot_precision(q.dtype))
    tiles = dict(MAX_SEQS=_max_seqs(n_seqs), SCAN_ABOVE=_SCAN_ABOVE)
    qk_scale, scale = ctx.scale * _LOG2E, ctx.scale

    # always: the dK/dV kernels read delta
    dq = torch.empty_like(q)
    delta = torch.empty_like(lse)
    c = cfgs.dq
    assert c.block_m % c.block_n == 0, "own keys before a query tile come in whole key tiles"
    _dq_kernel[(triton.cdiv(total, c.block_m) + n_seqs, hq)](
        q, k_prefix, v_prefix, k, v, out, dout, dq, lse, delta, cu,
        *_st(q), *_st(k_prefix), *_st(v_prefix), *_st(k), *_st(v), *_st(out),
        *_st(dout), *_st(dq), n_seqs, n_prefix, total, qk_scale, scale,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps,
        num_stages=c.num_stages, **common, **tiles,
    )  # fmt: skip

    dk = dv = None
    c = cfgs.dkdv
    if need_k or need_v:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        _dkdv_own_kernel[(triton.cdiv(total, c.block_n) + n_seqs, hkv)](
            q, k, v, dout, dk, dv, lse, delta, cu,
            *_st(q), *_st(k), *_st(v), *_st(dout), *_st(dk), *_st(dv),
            n_seqs, total, qk_scale, scale,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps,
            num_stages=c.num_stages, **common, **tiles,
        )  # fmt: skip

    dkp = dvp = None
    gk, gv = ctx.grad_cache if ctx.grad_cache is not None else (None, None)
    # a needed gradient without a cache entry is ordinary: a fresh fp32 buffer takes its place
    own_k, own_v = need_kp and gk is None, need_vp and gv is None
    if (need_kp or need_vp) and n_prefix > 0:
        if own_k:
            gk = torch.zeros(n_prefix, hkv, d, dtype=torch.float32, device=q.device)
        if own_v:
            gv = torch.zeros(n_prefix, hkv, d, dtype=torch.float32, device=q.device)
        # a side that needs no gradient is never written: the other's buffer lends its pointer
        gk, gv = (gv if gk is None else gk), (gk if gv is None else gv)
        key_tiles = triton.cdiv(n_prefix, c.block_n)
        split = launch.prefix_split(
            key_tiles, hkv, triton.cdiv(total, c.block_m), ctx.deterministic
        )
        _dkdv_prefix_kernel[(key_tiles, hkv, split)](
            q, k_prefix, v_prefix, dout, gk, gv, lse, delta,
            *_st(q), *_st(k_prefix), *_st(v_prefix), *_st(dout), *_st(gk), *_st(gv),
            n_prefix, total, qk_scale, scale,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, ATOMIC=split > 1,
            WRITE_K=bool(need_kp), WRITE_V=bool(need_vp),
            num_warps=c.num_warps, num_stages=c.num_stages, **common,
        )  # fmt: skip
        dkp = gk.to(k_prefix.dtype) if own_k else None
        dvp = gv.to(v_prefix.dtype) if own_v else None
    else:
        dkp = torch.zeros_like(k_prefix) if own_k else None
        dvp = torch.zeros_like(v_prefix) if own_v else None

    return (
        dq if need_q else None, dkp, dvp,
        dk if need_k else None, dv if need_v else None,
        None, None, None, None, None,
    )  # fmt: skip
