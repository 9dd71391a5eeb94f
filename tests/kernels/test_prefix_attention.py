"""The Triton prefix-attention kernels against the reference: on CUDA when present, else on CPU
through Triton's interpreter (tiny shapes; the interpreter runs ~50 ms per program)."""

import dataclasses
import importlib

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hbmplan.kernels import launch, prefix_attention
from tests.helpers.attention_cases import (
    NAMES,
    assert_by_rule,
    assert_tight,
    attention_math,
    delta_rounding_effect,
    make_case,
    run,
)

pa_module = importlib.import_module("hbmplan.kernels.prefix_attention")

# (Hq, Hkv): no grouping, groups of 2, 3 and 4, two KV heads
HEADS = [(1, 1), (2, 1), (3, 1), (4, 1), (4, 2)]


def shapes(min_prefix=0):
    """Response lengths 1..36 against the interpreter's 16/32-row tiles, 1..3 packed sequences,
    prompts up to 40 (mostly not a multiple of a tile), head counts, a seed."""
    return st.tuples(
        st.lists(st.integers(1, 36), min_size=1, max_size=3),
        st.integers(min_prefix, 40),
        st.sampled_from(HEADS),
        st.integers(0, 2**16),
    )


def _reference(case, dtype=torch.float64):
    return run(case, dtype, impl="reference")


@settings(max_examples=12)
@given(shape=shapes())
@example(shape=([70, 1], 33, (2, 1), 0))  # several tiles of every kernel in one sequence
@example(shape=([1, 1, 1], 1, (3, 1), 1))
@example(shape=([5, 31, 20], 12, (3, 1), 5))  # failed the fixed 1e-6 bound
@example(shape=([9, 10, 31], 7, (1, 1), 464))  # failed the fixed 1e-6 bound
@example(shape=([19], 18, (3, 1), 23248))  # failed the fixed 1e-6 bound
def test_fp32_matches_reference(device, shape):
    lens, n_prefix, (hq, hkv), seed = shape
    case = make_case(lens, n_prefix, hq, hkv, seed=seed, device=device)
    got = run(case, torch.float32, impl="triton")
    want = _reference(case)
    for name in NAMES:
        assert_tight(got[name], want[name], case.reduction_length, name)


@settings(max_examples=8)
@given(shape=shapes(min_prefix=1), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
@example(shape=([70, 1], 33, (4, 2), 0), dtype=torch.bfloat16)
def test_low_precision_by_tolerance_rule(device, shape, dtype):
    # A prompt of >= 1 token, as the schedule's (P - 1 >= 1). With none, a query that sees only
    # itself has dQ = 0 exactly, while a flash kernel's dO.v - rowsum(dO * O), two summation
    # orders of the same number, leaves ~1e-8: no relative rule admits that.
    lens, n_prefix, (hq, hkv), seed = shape
    case = make_case(lens, n_prefix, hq, hkv, dtype=dtype, seed=seed, device=device)
    got = run(case, dtype, impl="triton")
    dense = run(case, dtype, attention=attention_math)
    want = _reference(case)
    flash = delta_rounding_effect(case, dtype)
    for name in NAMES:
        assert_by_rule(got[name], dense[name], want[name], name, flash[name])


def test_head_dim_128(device):
    case = make_case([19, 1, 7], 37, 4, 2, d=128, seed=1, device=device)
    got = run(case, torch.float32, impl="triton")
    want = _reference(case)
    for name in NAMES:
        assert_tight(got[name], want[name], case.reduction_length, name)


def test_many_sequences_take_the_scan(device, monkeypatch):
    # above _SCAN_ABOVE packed sequences a kernel finds its tile with tl.cumsum
    monkeypatch.setattr(pa_module, "_SCAN_ABOVE", 8)
    case = make_case([1, 3, 1, 2, 5, 1, 1, 4, 2, 1, 17, 1], 9, 2, 1, seed=2, device=device)
    got = run(case, torch.float32, impl="triton")
    want = _reference(case)
    for name in NAMES:
        assert_tight(got[name], want[name], case.reduction_length, name)


def _cache(case, dtype=torch.float32):
    return tuple(torch.zeros_like(case.k_prefix, dtype=dtype) for _ in range(2))


@pytest.mark.parametrize("deterministic", [True, False])
def test_grad_cache_accumulates_the_sum_of_separate_gradients(device, deterministic):
    cases = [
        make_case(lens, 23, 4, 2, seed=s, device=device)
        for s, lens in enumerate([[5, 9], [30], [1, 2, 3]])
    ]
    shared = cases[0]
    for c in cases[1:]:  # the same prompt K/V for every call, as across a schedule's microbatches
        c.k_prefix, c.v_prefix = shared.k_prefix, shared.v_prefix
    start = torch.randn(2, *shared.k_prefix.shape, dtype=torch.float32, device=device)
    cache = (start[0].clone(), start[1].clone())
    separate = []
    for c in cases:
        got = run(c, torch.float32, impl="triton", grad_cache=cache, deterministic=deterministic)
        assert got["dk_prefix"] is None and got["dv_prefix"] is None
        separate.append(run(c, torch.float32, impl="triton", deterministic=deterministic))
    for i, name in enumerate(("dk_prefix", "dv_prefix")):
        total = start[i] + separate[0][name] + separate[1][name] + separate[2][name]
        if deterministic:  # one program adds each cache row: same roundings in the same order
            assert torch.equal(cache[i], total), name
        else:
            torch.testing.assert_close(cache[i], total, rtol=1e-6, atol=1e-6)


def test_grad_cache_in_the_schedule_layout(device):
    # the schedule keeps prompt K/V and gK/gV as [1, Hkv, Pp, D]: a transposed view goes in and the
    # buffer itself is updated, with low-precision K/V and an fp32 cache
    case = make_case([6, 11], 21, 4, 2, dtype=torch.bfloat16, seed=3, device=device)
    leaves = [
        x.to(torch.bfloat16).transpose(0, 1).unsqueeze(0).contiguous() for x in case.inputs[1:3]
    ]
    buffers = [torch.zeros(1, 2, 21, 64, device=device) for _ in range(2)]
    q, k, v = (x.to(torch.bfloat16).requires_grad_() for x in (case.q, case.k, case.v))
    kp, vp = (x.requires_grad_() for x in leaves)
    out = prefix_attention(
        q, kp[0].transpose(0, 1), vp[0].transpose(0, 1), k, v, case.cu_seqlens,
        grad_cache=(buffers[0][0].transpose(0, 1), buffers[1][0].transpose(0, 1)), impl="triton",
    )  # fmt: skip
    out.backward(case.dout.to(torch.bfloat16))
    assert kp.grad is None and vp.grad is None
    want = _reference(case)
    dense = run(case, torch.bfloat16, attention=attention_math)
    flash = delta_rounding_effect(case, torch.bfloat16)["dk_prefix"]
    assert_by_rule(
        buffers[0][0].transpose(0, 1), dense["dk_prefix"], want["dk_prefix"], "gk", flash
    )
    assert_by_rule(buffers[1][0].transpose(0, 1), dense["dv_prefix"], want["dv_prefix"], "gv")


def _sm_count(monkeypatch, sms):
    real = launch.detect()
    monkeypatch.setattr(launch, "detect", lambda: dataclasses.replace(real, sm_count=sms))


def test_deterministic_is_bitwise_reproducible_whatever_the_card(device, monkeypatch):
    case = make_case([13, 20], 45, 4, 1, seed=4, device=device)
    results = []
    for sms in (1, 4, 64, 132):  # different cards would split the prompt loop differently
        _sm_count(monkeypatch, sms)
        for _ in range(2):
            cache = _cache(case)
            got = run(case, torch.float32, impl="triton", grad_cache=cache, deterministic=True)
            results.append((got, cache))
    first, first_cache = results[0]
    for got, cache in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(cache, first_cache, strict=True))
        for name in ("out", "dq", "dk", "dv"):
            assert torch.equal(got[name], first[name]), name
    # and the non-deterministic launches at those SM counts do split the prompt loop
    splits = set()
    for sms in (1, 4, 64, 132):
        _sm_count(monkeypatch, sms)
        splits.add(launch.prefix_split(2, 1, 3, deterministic=False))
    assert len(splits) > 1


def test_split_prompt_gradient_matches_reference(device, monkeypatch):
    # the atomic path: many SMs for few prompt tiles split the query loop into several programs
    _sm_count(monkeypatch, 64)
    assert launch.prefix_split(2, 1, 3, deterministic=False) == 3  # 2 key tiles, 3 query tiles
    case = make_case([40, 9], 50, 2, 1, seed=5, device=device)
    got = run(case, torch.float32, impl="triton")
    want = _reference(case)
    for name in NAMES:
        assert_tight(got[name], want[name], case.reduction_length, name)


def test_only_requested_gradients(device):
    case = make_case([7, 3], 12, 2, 1, seed=6, device=device)
    q = case.q.float().requires_grad_()
    rest = [x.float() for x in case.inputs[1:]]
    cache = _cache(case)
    out = prefix_attention(q, *rest, case.cu_seqlens, grad_cache=cache, impl="triton")
    out.backward(case.dout.float())
    want = _reference(case)
    assert_tight(q.grad, want["dq"], case.reduction_length, "dq")
    # k_prefix/v_prefix do not require grad: the cache is left alone
    assert not cache[0].any() and not cache[1].any()


def test_auto_uses_the_reference_on_cpu(monkeypatch):
    case = make_case([3, 4], 5, 2, 1)
    calls = []
    real = pa_module.prefix_attention_varlen_ref
    monkeypatch.setattr(
        pa_module, "prefix_attention_varlen_ref", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    prefix_attention(*[x.float() for x in case.inputs], case.cu_seqlens)
    assert calls == [1]


def test_triton_on_cpu_without_the_interpreter_raises(monkeypatch):
    real = launch.detect()
    monkeypatch.setattr(launch, "detect", lambda: dataclasses.replace(real, interpret=False))
    case = make_case([3], 5, 2, 1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        prefix_attention(*[x.float() for x in case.inputs], case.cu_seqlens, impl="triton")


@pytest.mark.parametrize(
    ("d", "dtype", "match"),
    [(32, torch.float32, "head dim must be one of"), (64, torch.float64, "dtype must be")],
)
def test_triton_rejects_unsupported_inputs(d, dtype, match):
    case = make_case([3], 5, 2, 1, d=d)
    with pytest.raises(ValueError, match=match):
        prefix_attention(*[x.to(dtype) for x in case.inputs], case.cu_seqlens, impl="triton")


def test_triton_rejects_a_non_fp32_cache():
    case = make_case([3], 5, 2, 1)
    cache = _cache(case, torch.float64)
    with pytest.raises(ValueError, match="grad_cache must be float32"):
        prefix_attention(
            *[x.float() for x in case.inputs], case.cu_seqlens, grad_cache=cache, impl="triton"
        )
