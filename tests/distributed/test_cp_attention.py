"""Context parallel's pieces on one process: the prompt split, partial attention merged by
log-sum-exp, the exchange choice, the config's checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import hbmplan
from hbmplan.distributed.context_parallel import cp_rounds
from hbmplan.distributed.cp_attention import (
    PromptSplit,
    choose_exchange,
    exchange_elements,
    merge_partials,
    partial_attention,
)
from hbmplan.kernels.reference import prefix_attention_ref
from hbmplan.runtime.step_plan import Microbatch


@given(
    n=st.integers(1, 200), cp=st.integers(1, 8), balance=st.sampled_from(["zigzag", "contiguous"])
)
@example(n=1, cp=2, balance="zigzag")  # P = 2: one rank holds nothing
@example(n=9, cp=2, balance="zigzag")  # not divisible
def test_split_covers_each_token_once(n, cp, balance):
    split = PromptSplit(n, cp, balance)
    order = split.gathered_order()
    assert sorted(order.tolist()) == list(range(n))
    assert max(split.lengths) - min(split.lengths) <= (2 if balance == "zigzag" else 1)
    assert split.valid_rows().numel() == n


@given(n=st.integers(1, 400), cp=st.integers(2, 8))
@example(n=61, cp=4)  # uneven chunks: one late token more is up to n keys of work
@example(n=3, cp=2)  # fewer tokens than chunks: [0] against [1, 2]
def test_zigzag_balances_causal_work(n, cp):
    """Causal work of a slice: the keys its queries see, sum of (position + 1). Zig-zag is
    exactly even when 2·cp chunks divide n, and within two tokens' work (2n) of even always."""
    work = [sum(i + 1 for i in PromptSplit(n, cp).indices(r)) for r in range(cp)]
    assert max(work) - min(work) <= (0 if n % (2 * cp) == 0 else 2 * n)


def test_partials_merged_by_lse_equal_one_attention():
    torch.manual_seed(0)
    T, Hq, Hkv, D, P = 5, 4, 2, 8, 11
    q = torch.randn(T, Hq, D, dtype=torch.float64)
    kp, vp = torch.randn(2, P, Hkv, D, dtype=torch.float64)
    k, v = torch.randn(2, T, Hkv, D, dtype=torch.float64)
    own = torch.ones(T, T, dtype=torch.bool).tril()
    parts = [partial_attention(q, k, v, own, D**-0.5)]
    parts += [partial_attention(q, kp[s], vp[s], None, D**-0.5) for s in (slice(0, 4), slice(4, P))]
    parts.append(partial_attention(q, kp[:0], vp[:0], None, D**-0.5))  # an empty slice
    got = merge_partials(parts)
    rows = [x.transpose(0, 1)[None] for x in (q, kp, vp, k, v)]
    want = prefix_attention_ref(rows[0], rows[1], rows[2], rows[3], rows[4])[0].transpose(0, 1)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def test_exchange_follows_the_volume():
    shape = dict(heads=32, kv_heads=8, head_dim=128, slice_len=4096)
    assert choose_exchange("auto", 2, tokens=256, **shape) == "pass-q"  # short responses
    assert choose_exchange("auto", 2, tokens=8192, **shape) == "all-gather"
    assert choose_exchange("all-gather", 2, tokens=1, **shape) == "all-gather"
    q = exchange_elements("pass-q", 2, tokens=256, **shape)
    assert q == 256 * 32 * (4 * 128 + 2)
    assert exchange_elements("all-gather", 4, **shape) == 3 * 4096 * 4 * 8 * 128
    with pytest.raises(ValueError, match="exchange must be one of"):
        exchange_elements("ring", 2, **shape)


def test_rounds_deal_longest_first_and_fill_with_none():
    mbs = [Microbatch((i,), 1, t, 0) for i, t in enumerate([3, 9, 1, 5, 7])]
    rounds = cp_rounds(mbs, 2)
    assert [[mb.tokens if mb else None for mb in r] for r in rounds] == [[9, 7], [5, 3], [1, None]]


def test_config_checks_cp_fields():
    with pytest.raises(TypeError, match="cp_mesh must be a 1-D DeviceMesh or a ProcessGroup"):
        hbmplan.ReuseConfig(cp_mesh="world")
    with pytest.raises(ValueError, match="cp_exchange must be one of"):
        hbmplan.ReuseConfig(cp_exchange="ring")
    with pytest.raises(ValueError, match="cp_balance must be one of"):
        hbmplan.ReuseConfig(cp_balance="random")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_partial_attention_gradients_in_key_blocks(masked, chunk):
    """The block-recomputing backward (output and log-sum-exp both differentiated) against
    finite differences, with blocks that split the keys unevenly and with one block."""
    torch.manual_seed(1)
    q = torch.randn(5, 4, 4, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(7, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = None
    if masked:
        mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(2)) > 0.3
        mask[:, 0] = True  # every query sees a key
    fn = lambda q, k, v: partial_attention(q, k, v, mask, 0.3, chunk)  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~2000 tiny evaluations: on a busy machine threads only wait
    try:
        assert torch.autograd.gradcheck(fn, (q, k, v))
    finally:
        torch.set_num_threads(threads)
