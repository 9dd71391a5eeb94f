"""Prompt K/V without a gradient (only frozen weights produced them): the kernel and its reference
take a ``grad_cache`` with ``None`` entries, compute no gradient for them, and skip the prompt
dK/dV kernel when neither needs one."""

from __future__ import annotations

import importlib

import pytest
import torch

from hbmplan.kernels import prefix_attention
from tests.helpers.attention_cases import assert_tight, make_case, run

pa_module = importlib.import_module("hbmplan.kernels.prefix_attention")

# (k_prefix requires grad, v_prefix requires grad, cache entry for k, cache entry for v)
PATTERNS = [
    (False, True, False, True),  # LoRA on v only: K has no graph, V its buffer
    (True, False, True, False),
    (False, False, False, False),  # a frozen layer: nothing to do for the prompt
    (True, True, True, False),  # a K in the cache beside an ordinary V gradient
    (False, True, True, True),  # a buffer for a K that needs no gradient stays untouched
]


class _Launches:
    """Counts launches of a Triton kernel (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]


# (impl, deterministic): the deterministic launch (no atomics) for the patterns that write one
# side only; the reference has no such switch
CALLS = [
    (impl, det, *pattern)
    for i, pattern in enumerate(PATTERNS)
    for impl, det in [("reference", False), ("triton", False)] + [("triton", True)] * (i in (0, 3))
]


@pytest.mark.parametrize("impl, deterministic, need_k, need_v, has_gk, has_gv", CALLS)
def test_none_cache_entries(
    request, impl, deterministic, need_k, need_v, has_gk, has_gv, monkeypatch
):
    if impl == "triton":
        request.getfixturevalue("device")  # skips without Triton or its interpreter
    case = make_case([5, 9], 13, 2, 1, seed=7)
    want = run(case, torch.float64, impl="reference")
    launches = _Launches(pa_module._dkdv_prefix_kernel)
    monkeypatch.setattr(pa_module, "_dkdv_prefix_kernel", launches)
    q, kp, vp, k, v = (x.float().clone() for x in case.inputs)
    for x, need in ((q, True), (kp, need_k), (vp, need_v), (k, True), (v, True)):
        x.requires_grad_(need)
    start = torch.randn(2, *kp.shape, generator=torch.Generator().manual_seed(1))
    gk, gv = start[0].clone(), start[1].clone()
    cache = (gk if has_gk else None, gv if has_gv else None)
    out = prefix_attention(q, kp, vp, k, v, case.cu_seqlens, grad_cache=cache, impl=impl,
                           deterministic=deterministic)  # fmt: skip
    out.backward(case.dout.float())
    for name, x in (("dq", q), ("dk", k), ("dv", v)):
        assert_tight(x.grad, want[name], case.reduction_length, name)
    for name, x, need, g, s in (
        ("dk_prefix", kp, need_k, cache[0], start[0]),
        ("dv_prefix", vp, need_v, cache[1], start[1]),
    ):
        if need and g is not None:  # added into the cache in place, no autograd gradient
            assert x.grad is None
            assert_tight(g - s, want[name], case.reduction_length, name)
        elif need:  # ordinary
            assert_tight(x.grad, want[name], case.reduction_length, name)
        else:
            assert x.grad is None
        if g is not None and not need:
            assert torch.equal(g, s), f"{name}: a buffer for a tensor without grad was written"
    if impl == "triton":
        assert launches.calls == int(need_k or need_v)
