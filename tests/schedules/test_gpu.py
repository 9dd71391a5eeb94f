"""The schedule on a CUDA device: equivalence, offload through real streams, allocator peaks."""

from __future__ import annotations

import pytest
import torch

import hbmplan
from hbmplan.schedules import dense_step
from tests.helpers import assert_tolerance_rule, grads_of, pg_loss, random_group, tiny_reference

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


def _model(dtype, layers=4, hidden=512):  # head dim 64: the Triton kernel's
    model = tiny_reference(
        dtype, layers=layers, hidden=hidden, heads=8, kv_heads=2, max_positions=4096
    )
    return model.to(DEVICE)


def _groups(P=512, lens=(64, 17, 1, 40, 64, 33), seed=0):
    return [random_group(P, list(lens), seed=seed, device=DEVICE, dtype=torch.float32)]


@pytest.mark.parametrize("attention", ["auto", "padded"])
def test_bf16_reuse_within_tolerance_rule_on_cuda(attention):
    groups = _groups()
    m64 = _model(torch.float64)
    ref = grads_of(m64, lambda: dense_step(m64, groups, pg_loss))
    m16 = _model(torch.bfloat16)
    dense16 = grads_of(m16, lambda: dense_step(m16, groups, pg_loss))
    box = {}

    def reuse():
        with hbmplan.memory(m16, tokens_per_microbatch=256, attention=attention) as mem:
            box["stats"] = mem.step(groups, pg_loss)

    reuse16 = grads_of(m16, reuse)
    assert box["stats"].attention == ("triton" if attention == "auto" else "padded")
    assert_tolerance_rule(reuse16, dense16, ref)


def test_deterministic_kernel_step_is_bitwise_reproducible_on_cuda():
    model = _model(torch.bfloat16)
    groups = _groups(P=2048, lens=(256,) * 8, seed=3)

    def run():
        def fn():
            with hbmplan.memory(model, tokens_per_microbatch=1024, deterministic=True) as mem:
                mem.step(groups, pg_loss)

        return grads_of(model, fn)

    first, second = run(), run()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offload_through_cuda_streams_is_bitwise_same(dtype):
    model = _model(dtype)
    groups = _groups(seed=1)

    def run(**kw):
        def fn():
            with hbmplan.memory(model, tokens_per_microbatch=256, **kw) as mem:
                for _ in range(3):  # planned, then streamed twice
                    mem.step(groups, pg_loss)

        return grads_of(model, fn)

    base, moved = run(offload="off"), run(offload="all")
    assert all(torch.equal(base[k], moved[k]) for k in base)


def test_offload_lowers_phase_b_peak_and_pinned_memory_is_given_back():
    model = _model(torch.bfloat16, layers=4, hidden=512)
    groups = _groups(P=2048, lens=(128,) * 8, seed=2)
    peaks = {}
    for mode in ("off", "all"):
        with hbmplan.memory(model, offload=mode, tokens_per_microbatch=512) as mem:
            mem.step(groups, pg_loss)
            stats = mem.step(groups, pg_loss)
        peaks[mode] = stats.phases["B"].peak_bytes
        model.zero_grad(set_to_none=True)
        assert mem._offloader._pool is None
    assert peaks["all"] < 0.6 * peaks["off"], peaks
