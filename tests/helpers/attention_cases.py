"""Inputs, references and the tolerance rule shared by the prefix-attention tests."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from hbmplan.kernels import prefix_attention

NAMES = ("out", "dq", "dk_prefix", "dv_prefix", "dk", "dv")


@dataclass
class Case:
    """fp64 values (already rounded to the dtype under test) of one packed call."""

    q: torch.Tensor  # [T, Hq, D]
    k_prefix: torch.Tensor  # [Pp, Hkv, D]
    v_prefix: torch.Tensor
    k: torch.Tensor  # [T, Hkv, D]
    v: torch.Tensor
    dout: torch.Tensor  # [T, Hq, D]
    cu_seqlens: torch.Tensor  # int32 [N+1], CPU

    @property
    def inputs(self) -> list[torch.Tensor]:
        return [self.q, self.k_prefix, self.v_prefix, self.k, self.v]

    @property
    def reduction_length(self) -> int:
        """n, an upper bound on the terms any output or gradient entry sums: a D-long dot
        product, a query's softmax over Pp + L keys, and a prompt key's dK/dV over every query of
        every sequence and of its head group (T x Hq/Hkv)."""
        lens = self.cu_seqlens.diff().tolist()
        group = self.q.shape[1] // self.k.shape[1]
        return self.q.shape[-1] + self.k_prefix.shape[0] + max(lens) + sum(lens) * group


def make_case(lens, n_prefix, hq, hkv, d=64, dtype=torch.float32, seed=0, device="cpu") -> Case:
    """Random inputs whose values are exactly representable in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens)

    def rand(*shape):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return x.to(dtype).to(device=device, dtype=torch.float64)

    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return Case(
        rand(total, hq, d), rand(n_prefix, hkv, d), rand(n_prefix, hkv, d),
        rand(total, hkv, d), rand(total, hkv, d), rand(total, hq, d), cu,
    )  # fmt: skip


def run(case: Case, dtype, attention=None, **kw) -> dict[str, torch.Tensor | None]:
    """Output and the five input gradients of ``attention`` (default: prefix_attention) in
    ``dtype``; the cu_seqlens stays on the CPU."""
    attention = attention or prefix_attention
    xs = [x.detach().to(dtype).clone().requires_grad_() for x in case.inputs]
    out = attention(*xs, case.cu_seqlens, **kw)
    out.backward(case.dout.to(dtype))
    return dict(zip(NAMES, [out.detach()] + [x.grad for x in xs], strict=True))


def attention_math(q, k_prefix, v_prefix, k, v, cu_seqlens, **_):
    """Plain attention formula, computed entirely in the inputs' dtype: scores, softmax and P.V
    each rounded to it. Flash-attention's ``attention_ref(upcast=False)``: the error budget of a
    straightforward low-precision implementation, the ``x_dense`` of the tolerance rule."""
    outs, group = [], q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    for lo, hi in itertools.pairwise(bounds):
        keys = torch.cat([k_prefix, k[lo:hi]]).repeat_interleave(group, 1).transpose(0, 1)
        values = torch.cat([v_prefix, v[lo:hi]]).repeat_interleave(group, 1).transpose(0, 1)
        qs = q[lo:hi].transpose(0, 1)  # [Hq, L, D]
        scores = (qs @ keys.transpose(1, 2)) * q.shape[-1] ** -0.5
        n_q, n_k = qs.shape[1], keys.shape[1]
        visible = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        outs.append((p @ values).transpose(0, 1))
    return torch.cat(outs)


def delta_rounding_effect(case: Case, dtype) -> dict[str, torch.Tensor | float]:
    """The exact (fp64) change of each gradient when rowsum(dO * O) is taken from the output O
    rounded to ``dtype``, as flash kernels do: their backward only has the stored, rounded O. It
    matters when a query sees very few keys (dS = P (dP - rowsum) nearly cancels); dV and the
    output are unaffected."""
    q, kp, vp, k, v, dout = (x.double() for x in (*case.inputs, case.dout))
    group, scale = q.shape[1] // k.shape[1], q.shape[-1] ** -0.5
    dq, dkp, dk = torch.zeros_like(q), torch.zeros_like(kp), torch.zeros_like(k)
    for lo, hi in itertools.pairwise(case.cu_seqlens.tolist()):
        keys = torch.cat([kp, k[lo:hi]]).repeat_interleave(group, 1).transpose(0, 1)  # [Hq, S, D]
        values = torch.cat([vp, v[lo:hi]]).repeat_interleave(group, 1).transpose(0, 1)
        qs, dos = q[lo:hi].transpose(0, 1), dout[lo:hi].transpose(0, 1)  # [Hq, L, D]
        n_q, n_k = qs.shape[1], keys.shape[1]
        visible = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        p = torch.softmax((qs @ keys.transpose(1, 2) * scale).masked_fill(~visible, -torch.inf), -1)
        out = p @ values
        d_delta = (dos * (out.to(dtype).double() - out)).sum(-1, keepdim=True)  # [Hq, L, 1]
        d_ds = -p * d_delta  # dS = P (dP - delta)
        dq[lo:hi] += (scale * d_ds @ keys).transpose(0, 1)
        d_keys = (scale * d_ds.transpose(1, 2) @ qs).unflatten(0, (-1, group)).sum(1)  # [Hkv,S,D]
        dkp += d_keys[:, : kp.shape[0]].transpose(0, 1)
        dk[lo:hi] += d_keys[:, kp.shape[0] :].transpose(0, 1)
    return dict(out=0.0, dq=dq, dk_prefix=dkp, dv_prefix=0.0, dk=dk, dv=0.0)


def assert_by_rule(x, x_dense, x64, name="", flash_delta=0.0):
    """The tolerance rule: max|x - x64| <= 2 max|x_dense - x64| + atol, atol being the rounding of
    x64 to x's own dtype, plus ``flash_delta``: the exact effect of the kernel's rounded output O
    on its own backward (:func:`delta_rounding_effect`)."""
    if x64.numel() == 0:
        return
    atol = (x64.to(x.dtype).double() - x64).abs().max().item()
    if isinstance(flash_delta, torch.Tensor):
        atol += flash_delta.abs().max().item()
    err = (x.double() - x64).abs().max().item()
    dense = (x_dense.double() - x64).abs().max().item()
    assert err <= 2 * dense + atol, f"{name}: error {err:.3g} > 2 * {dense:.3g} + {atol:.3g}"


FP32_UNIT_ROUNDOFF = 2.0**-24


def assert_tight(x, x64, n, name="", c=2.0):
    """fp32 against fp64: max|x - x64| <= c * sqrt(n) * u * max(|x64|, 1), with n the reduction
    length (:attr:`Case.reduction_length`) and u = 2**-24 the fp32 unit roundoff.

    Rounding errors of an n-term sum grow like sqrt(n) * u in practice (random-walk bound; the
    worst case is n * u), so a fixed bound fails on long reductions by chance (it did: ~1 draw
    in 20 against 1e-6; those draws are pinned). c = 2 measured 3x above the largest
    err / (sqrt(n) u scale) over 60 random draws (0.6). The floor 1 is the inputs' scale (unit
    normal): it covers outputs that vanish exactly, like dQ of a query that sees one key, which
    a flash kernel computes from the rounded output O as ~eps, not 0."""
    if x64.numel() == 0:
        return
    scale = max(x64.abs().max().item(), 1.0)
    bound = c * n**0.5 * FP32_UNIT_ROUNDOFF * scale
    err = (x.double() - x64).abs().max().item()
    assert err <= bound, f"{name}: error {err:.3g} > {c:g} * sqrt({n}) * u * {scale:.3g}"


def run_by_sequence(case: Case, dtype, attention, **kw) -> dict[str, torch.Tensor]:
    """:func:`run` one sequence at a time (memory of one sequence), gradients of the shared
    prompt K/V summed: the same results for an attention without a gradient cache."""
    parts = []
    for lo, hi in itertools.pairwise(case.cu_seqlens.tolist()):
        sub = Case(case.q[lo:hi], case.k_prefix, case.v_prefix, case.k[lo:hi], case.v[lo:hi],
                   case.dout[lo:hi], torch.tensor([0, hi - lo], dtype=torch.int32))  # fmt: skip
        parts.append(run(sub, dtype, attention, **kw))
    out = {n: torch.cat([p[n] for p in parts]) for n in ("out", "dq", "dk", "dv")}
    for n in ("dk_prefix", "dv_prefix"):
        out[n] = torch.stack([p[n].double() for p in parts]).sum(0).to(parts[0][n].dtype)
    return out
