"""The gradient cache alone: leaves alias the prompt K/V, microbatch gradients add into its
buffers (fp32 for 16-bit K/V), and phase C hands the totals to the prompt graph in one backward."""

from __future__ import annotations

import weakref

import pytest
import torch

from hbmplan.kernels.accumulate import accumulate_into, accumulation_dtype
from hbmplan.models.packed import cu_seqlens_for
from hbmplan.schedules.grad_cache import GradientCache


def _prompt(dtype, layers=2, heads=2, tokens=5, dim=4, seed=0):
    """A prompt 'graph': per layer k = x @ wk, v = x @ wv from one shared input x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g, dtype=dtype, requires_grad=True)
    ws = [torch.randn(dim, heads * dim, generator=g, dtype=dtype) for _ in range(2 * layers)]
    kv = [
        tuple((x @ w).view(tokens, heads, dim).transpose(0, 1)[None] for w in ws[2 * i : 2 * i + 2])
        for i in range(layers)
    ]
    return x, kv


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_microbatch_gradients_accumulate_and_reach_the_prompt(dtype):
    x, kv = _prompt(dtype)
    cache = GradientCache(kv)
    assert all(g.dtype == accumulation_dtype(dtype) for pair in cache.grads for g in pair)
    assert all(
        leaf.data_ptr() == t.data_ptr() and leaf.requires_grad and leaf.grad_fn is None
        for pair, lpair in zip(kv, cache.leaves, strict=True)
        for t, leaf in zip(pair, lpair, strict=True)
    )  # the leaves alias the K/V: no copy
    ups = [torch.randn(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
           for i in range(3)]  # fmt: skip
    for up in ups:  # three microbatches read every layer's K and V
        views = cache.views()
        loss = sum((t * up.to(dtype)).sum() for pair in views for t in pair)
        loss.backward()
    assert all(leaf.grad is None for pair in cache.leaves for leaf in pair)
    # the buffers hold the exact sum of what each microbatch sent, never rounded to bf16 between
    for pair in cache.grads:
        for g in pair:
            assert torch.equal(g[0], sum(up.to(dtype).to(g.dtype) for up in ups))
    sent = [g.to(dtype) for pair in cache.grads for g in pair]
    cache.backward()
    assert cache.grads == [] and cache.prompt_kv == []
    # phase C is one backward of the prompt graph from those totals
    x2, kv2 = _prompt(dtype)
    torch.autograd.backward([t for pair in kv2 for t in pair], sent)
    assert torch.equal(x.grad, x2.grad)


def test_bytes_and_packed_views():
    _, kv = _prompt(torch.bfloat16, layers=3, heads=2, tokens=7, dim=4)
    cache = GradientCache(kv)
    assert cache.kv_bytes == 2 * 3 * 2 * 7 * 4 * 2  # 2 L Hkv P D itemsize
    assert cache.nbytes == 2 * 3 * 2 * 7 * 4 * 4  # fp32 accumulators
    prefix = cache.packed(cu_seqlens_for([2, 3], "cpu"), 3, "reference")
    assert prefix.prefix_len == 7 and prefix.num_layers == 3
    for (k, _), (leaf, _), (gk, _), (buf, _) in zip(
        prefix.kv, cache.leaves, prefix.grad_cache, cache.grads, strict=True
    ):
        assert k.data_ptr() == leaf.data_ptr() and gk.data_ptr() == buf.data_ptr()
        assert k.shape == (7, 2, 4)


def test_release_drops_every_reference():
    _, kv = _prompt(torch.float32)
    cache = GradientCache(kv)
    refs = [weakref.ref(t) for group in (cache.grads, cache.leaves) for pair in group for t in pair]
    del kv
    cache.release()
    assert all(r() is None for r in refs)


def test_accumulate_into_is_identity_forward_and_adds_in_backward():
    x = torch.randn(3, requires_grad=True)
    buf = torch.ones(3, dtype=torch.float64)
    y = accumulate_into(x, buf)
    assert torch.equal(y, x)
    (2 * y).sum().backward()
    assert x.grad is None and torch.equal(buf, torch.full((3,), 3.0, dtype=torch.float64))
