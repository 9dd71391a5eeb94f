"""The packed (varlen) prefix-attention reference: against the padded reference, the plain
formula, its gradient-cache contract, and input validation."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hbmplan.kernels import prefix_attention, prefix_attention_ref, prefix_attention_varlen_ref
from tests.helpers.attention_cases import NAMES, attention_math, make_case, run

HEADS = [(2, 2), (4, 1), (4, 2), (6, 2)]
shapes = st.tuples(
    st.lists(st.integers(1, 12), min_size=1, max_size=5),
    st.integers(0, 20),
    st.sampled_from(HEADS),
    st.integers(0, 2**16),
)


def _padded(case):
    """The same call as right-padded rows for prefix_attention_ref: outputs and gradients
    gathered back to packed layout. Padded rows get zero output gradient."""
    bounds = case.cu_seqlens.tolist()
    lens = [hi - lo for lo, hi in itertools.pairwise(bounds)]
    longest = max(lens)

    def pad(x):  # [T, H, D] -> [N, H, longest, D]
        rows = [torch.nn.functional.pad(x[lo:hi], (0, 0, 0, 0, 0, longest - (hi - lo)))
                for lo, hi in itertools.pairwise(bounds)]  # fmt: skip
        return torch.stack(rows).transpose(1, 2)

    def unpad(x):  # [N, H, longest, D] -> [T, H, D]
        return torch.cat([x[i, :, :n].transpose(0, 1) for i, n in enumerate(lens)])

    q, k, v = (pad(x).requires_grad_() for x in (case.q, case.k, case.v))
    kp, vp = (x.transpose(0, 1).unsqueeze(0).clone().requires_grad_() for x in case.inputs[1:3])
    out = prefix_attention_ref(q, kp, vp, k, v)
    out.backward(pad(case.dout))
    grads = [kp.grad[0].transpose(0, 1), vp.grad[0].transpose(0, 1), unpad(k.grad), unpad(v.grad)]
    return dict(zip(NAMES, [unpad(out.detach()), unpad(q.grad), *grads], strict=True))


@settings(max_examples=25)
@given(shape=shapes)
def test_varlen_matches_padded_reference(shape):
    lens, n_prefix, (hq, hkv), seed = shape
    case = make_case(lens, n_prefix, hq, hkv, d=16, seed=seed)
    got = run(case, torch.float64, attention=prefix_attention_varlen_ref)
    want = _padded(case)
    for name in NAMES:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12, msg=name)


@settings(max_examples=25)
@given(shape=shapes)
def test_varlen_matches_the_formula(shape):
    lens, n_prefix, (hq, hkv), seed = shape
    case = make_case(lens, n_prefix, hq, hkv, d=16, seed=seed)
    got = run(case, torch.float64, attention=prefix_attention_varlen_ref)
    want = run(case, torch.float64, attention=attention_math)
    for name in NAMES:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12, msg=name)


def test_formula_sees_the_prompt_and_own_earlier_tokens_only():
    # one query head, one KV head, D=1, q=1: softmax weights over visible keys are uniform when
    # all keys are equal, so the output is the mean of the visible values
    cu = torch.tensor([0, 2, 3], dtype=torch.int32)
    q = torch.ones(3, 1, 1, dtype=torch.float64)
    kp, k = torch.zeros(2, 1, 1, dtype=torch.float64), torch.zeros(3, 1, 1, dtype=torch.float64)
    vp = torch.tensor([1.0, 2.0], dtype=torch.float64).view(2, 1, 1)
    v = torch.tensor([10.0, 20.0, 40.0], dtype=torch.float64).view(3, 1, 1)
    out = prefix_attention_varlen_ref(q, kp, vp, k, v, cu).flatten().tolist()
    assert out == pytest.approx([(1 + 2 + 10) / 3, (1 + 2 + 10 + 20) / 4, (1 + 2 + 40) / 3])


def test_reference_grad_cache_adds_in_place_and_hides_prompt_gradients():
    case = make_case([4, 7], 9, 4, 2, d=16)
    want = run(case, torch.float64, attention=prefix_attention_varlen_ref)
    start = [torch.randn_like(case.k_prefix) for _ in range(2)]
    cache = (start[0].clone(), start[1].clone())
    got = run(case, torch.float64, attention=prefix_attention_varlen_ref, grad_cache=cache)
    assert got["dk_prefix"] is None and got["dv_prefix"] is None
    torch.testing.assert_close(cache[0], start[0] + want["dk_prefix"], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(cache[1], start[1] + want["dv_prefix"], rtol=1e-14, atol=1e-14)


def _inputs(**change):
    case = make_case([2, 3], 4, 4, 2, d=16)
    args = dict(q=case.q, k_prefix=case.k_prefix, v_prefix=case.v_prefix, k=case.k, v=case.v,
                cu_seqlens=case.cu_seqlens)  # fmt: skip
    args.update(change)
    return args


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(q=torch.zeros(5, 4)), "q must be 3-D"),
        (dict(k=torch.zeros(5, 1, 16, dtype=torch.float64)), r"k must be \[T, Hkv, D\]"),
        (dict(v=torch.zeros(5, 2, 8, dtype=torch.float64)), "v must have k's shape"),
        (dict(k_prefix=torch.zeros(4, 2, 8, dtype=torch.float64)), "k_prefix head dim"),
        (dict(v_prefix=torch.zeros(3, 2, 16, dtype=torch.float64)), "v_prefix must have"),
        (dict(q=torch.zeros(5, 3, 16, dtype=torch.float64)), "multiple of KV heads, got 3 and 2"),
        (dict(k=torch.zeros(5, 2, 16, dtype=torch.float32)), "k must have q's dtype"),
        (dict(cu_seqlens=torch.tensor([0, 2, 5])), "cu_seqlens must be int32, got torch.int64"),
        (dict(cu_seqlens=torch.tensor([0, 2, 2, 5], dtype=torch.int32)), "strictly increasing"),
        (dict(cu_seqlens=torch.tensor([1, 2, 5], dtype=torch.int32)), "start at 0, got 1"),
        (dict(cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32)), "end at T = 5"),
        (dict(cu_seqlens=torch.tensor([[0, 5]], dtype=torch.int32)), "1-D"),
    ],
)
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_invalid_inputs_name_the_rule_and_value(change, match, impl):
    with pytest.raises(ValueError, match=match):
        prefix_attention(**_inputs(**change), impl=impl)


@pytest.mark.parametrize(
    ("cache", "match"),
    [
        ((torch.zeros(4, 2, 16),), "a pair"),
        ((torch.zeros(4, 2, 16), torch.zeros(4, 2, 8)), "gv must have k_prefix's shape"),
        ((torch.zeros(16, 2, 4).transpose(0, 2), torch.zeros(4, 2, 16)), "contiguous last dim"),
    ],
)
def test_invalid_grad_cache(cache, match):
    with pytest.raises(ValueError, match=match):
        prefix_attention(**_inputs(), grad_cache=cache, impl="reference")


def test_invalid_impl():
    with pytest.raises(ValueError, match="impl must be"):
        prefix_attention(**_inputs(), impl="cuda")
