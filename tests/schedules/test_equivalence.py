"""Same as without: the reuse schedule's gradients equal the dense trainer's."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hbmplan
from hbmplan.schedules import dense_step, reuse_step
from tests.helpers import (
    assert_tolerance_rule,
    grads_of,
    max_rel_diff,
    pg_loss,
    random_group,
    tiny_hf,
    tiny_reference,
)

HF_FAMILIES = ["Llama", "Qwen2", "Qwen3", "Mistral"]


def dense_and_reuse(model, groups, loss=pg_loss, tpm_dense=None, tpm_reuse=None):
    dense = grads_of(model, lambda: dense_step(model, groups, loss, tpm_dense))

    def run():
        with hbmplan.memory(model, tokens_per_microbatch=tpm_reuse) as mem:
            mem.step(groups, loss)

    return dense, grads_of(model, run)


def test_reference_fp64_equal_to_dense():
    model = tiny_reference()
    groups = [random_group(17, [1, 6, 3, 9], seed=1)]
    dense, reuse = dense_and_reuse(model, groups)
    assert len(reuse) == len(list(model.parameters()))
    assert max_rel_diff(reuse, dense) <= 1e-12


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_hf_fp64_equal_to_dense(family):
    model = tiny_hf(family)
    groups = [random_group(15, [1, 4, 7], seed=2)]
    dense, reuse = dense_and_reuse(model, groups, tpm_reuse=16)
    assert max_rel_diff(reuse, dense) <= 1e-6


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_attention_implementations(attn):
    model = tiny_hf("Llama", attn=attn)
    groups = [random_group(9, [2, 5], seed=3)]
    dense, reuse = dense_and_reuse(model, groups)
    assert max_rel_diff(reuse, dense) <= 1e-6


@given(
    prompt_len=st.integers(2, 24),
    response_lens=st.lists(st.integers(1, 10), min_size=1, max_size=5),
    n_groups=st.integers(1, 3),
    budget=st.one_of(st.none(), st.integers(1, 40)),
    dense_budget=st.one_of(st.none(), st.integers(1, 80)),
    seed=st.integers(0, 2**16),
)
def test_reuse_equals_dense_property(
    prompt_len, response_lens, n_groups, budget, dense_budget, seed
):
    model = tiny_reference(seed=seed % 7)
    groups = [
        random_group(prompt_len + k, response_lens[k:] or response_lens, seed=seed + k)
        for k in range(n_groups)
    ]
    dense, reuse = dense_and_reuse(model, groups, tpm_dense=dense_budget, tpm_reuse=budget)
    assert max_rel_diff(reuse, dense) <= 1e-12


def test_logprobs_seen_by_the_loss_match_dense_including_boundary_token():
    """The first response token is predicted by the boundary token p[-1]; dropping that
    prediction shortens the log-probs, counting it twice shifts every later one."""
    model = tiny_reference()
    group = random_group(11, [1, 4, 6], seed=5)
    seen: dict[str, dict[int, torch.Tensor]] = {"dense": {}, "reuse": {}}

    def recorder(name):
        def loss(lp, g, i):
            seen[name][i] = lp.detach().clone()
            return pg_loss(lp, g, i)

        return loss

    dense_step(model, [group], recorder("dense"))
    reuse_step(model, [group], recorder("reuse"), tokens_per_microbatch=12)
    for i, r in enumerate(group.responses):
        assert seen["reuse"][i].shape == (r.numel(),)
        torch.testing.assert_close(seen["reuse"][i], seen["dense"][i], rtol=0, atol=1e-12)


def test_first_token_only_loss_flows_through_the_boundary_token():
    model = tiny_reference()
    groups = [random_group(8, [1, 3, 2], seed=6)]

    def first_token(lp, g, i):
        return -lp[0] * (i + 1)

    dense, reuse = dense_and_reuse(model, groups, loss=first_token)
    assert max_rel_diff(reuse, dense) <= 1e-12


def test_group_of_one_and_shortest_prompt():
    model = tiny_reference()
    groups = [random_group(2, [1], seed=7), random_group(2, [5], seed=8)]
    dense, reuse = dense_and_reuse(model, groups)
    assert max_rel_diff(reuse, dense) <= 1e-12


def test_grads_accumulate_like_backward():
    """Two steps accumulate into .grad exactly like two dense steps."""
    model = tiny_reference()
    g1, g2 = random_group(9, [3, 2], seed=9), random_group(12, [4], seed=10)

    def dense_twice():
        dense_step(model, [g1], pg_loss)
        dense_step(model, [g2], pg_loss)

    def reuse_twice():
        with hbmplan.memory(model) as mem:
            mem.step([g1], pg_loss)
            mem.step([g2], pg_loss)

    assert max_rel_diff(grads_of(model, reuse_twice), grads_of(model, dense_twice)) <= 1e-12


@pytest.mark.parametrize("kind", ["reference", "Qwen3"])
def test_bf16_within_tolerance_rule(kind):
    """|reuse_bf16 - ref64| <= 2 |dense_bf16 - ref64| + atol, per parameter; atol is the bf16
    rounding of the reference itself (a result cannot be closer than its own storage)."""
    make = (
        (lambda dt: tiny_reference(dt, seed=3))
        if kind == "reference"
        else (lambda dt: tiny_hf("Qwen3", dt, seed=3))
    )
    groups = [random_group(40, [8, 3, 12, 1], seed=11, dtype=torch.float32)]
    m64 = make(torch.float64)
    ref = grads_of(m64, lambda: dense_step(m64, groups, pg_loss))
    m16 = make(torch.bfloat16)
    dense16 = grads_of(m16, lambda: dense_step(m16, groups, pg_loss))

    def run():
        with hbmplan.memory(m16, tokens_per_microbatch=24) as mem:
            mem.step(groups, pg_loss)

    reuse16 = grads_of(m16, run)
    assert_tolerance_rule(reuse16, dense16, ref)
