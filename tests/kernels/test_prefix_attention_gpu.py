"""The Triton prefix-attention kernels at realistic sizes on a GPU: a prompt of 8k tokens, 16
packed responses of 1k, head dim 128, bf16."""

import pytest
import torch

from hbmplan.kernels import launch, prefix_attention
from tests.helpers.attention_cases import (
    NAMES,
    assert_by_rule,
    attention_math,
    delta_rounding_effect,
    make_case,
    run,
    run_by_sequence,
)

pytestmark = pytest.mark.gpu

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def realistic():
    return make_case([1024] * 16, 8192, 8, 2, d=128, dtype=BF16, seed=0, device="cuda")


def test_realistic_bf16_by_tolerance_rule(realistic):
    got = run(realistic, BF16, impl="triton")
    dense = run_by_sequence(realistic, BF16, attention_math)
    want = run_by_sequence(realistic, torch.float64, prefix_attention, impl="reference")
    flash = delta_rounding_effect(realistic, BF16)
    for name in NAMES:
        assert_by_rule(got[name], dense[name], want[name], name, flash[name])


def test_realistic_cache_and_device_cu_seqlens(realistic):
    # the schedule's way: fp32 cache, cu_seqlens already on the device; deterministically the
    # same numbers as the ordinary gradients before their rounding to bf16
    cache = tuple(torch.zeros_like(realistic.k_prefix, dtype=torch.float32) for _ in range(2))
    xs = [x.to(BF16).requires_grad_() for x in realistic.inputs]
    cu = realistic.cu_seqlens.cuda()
    out = prefix_attention(*xs, cu, grad_cache=cache, impl="triton", deterministic=True)
    out.backward(realistic.dout.to(BF16))
    plain = run(realistic, BF16, impl="triton", deterministic=True)
    assert torch.equal(out.detach(), plain["out"])
    assert torch.equal(cache[0].to(BF16), plain["dk_prefix"])
    assert torch.equal(cache[1].to(BF16), plain["dv_prefix"])


def test_deterministic_is_bitwise_reproducible_where_the_default_splits():
    # a 2k prompt with 2 KV heads is 32 prompt programs: the default splits them (atomics)
    # on any card with 64 SMs or more
    case = make_case([1024] * 8, 2048, 8, 2, d=128, dtype=BF16, seed=1, device="cuda")
    assert launch.prefix_split(2048 // 128, 2, 8 * 1024 // 64, deterministic=False) > 1
    caches = []
    for deterministic in (True, True, False):
        cache = tuple(torch.zeros_like(case.k_prefix, dtype=torch.float32) for _ in range(2))
        got = run(case, BF16, impl="triton", grad_cache=cache, deterministic=deterministic)
        caches.append((cache, got))
    (c1, g1), (c2, g2), (c3, _) = caches
    assert torch.equal(c1[0], c2[0]) and torch.equal(c1[1], c2[1])
    for name in ("out", "dq", "dk", "dv"):
        assert torch.equal(g1[name], g2[name]), name
    torch.testing.assert_close(c3[0], c1[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c3[1], c1[1], rtol=1e-5, atol=1e-5)
