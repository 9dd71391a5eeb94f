"""The smallest feasible budget a ``BudgetError`` names is the real one: the number a user
bisects with succeeds, and half an allocation granule less does not."""

from __future__ import annotations

import torch
from hypothesis import example, given
from hypothesis import strategies as st

import hbmplan
from hbmplan.losses import PolicyLoss, group_advantages
from hbmplan.models import DecoderConfig, ReferenceDecoder
from hbmplan.runtime.probe import PROBE_TOKENS
from tests.helpers import pg_loss, random_group, tiny_reference

GRANULE = 512  # the host pool's block alignment: what "within one allocation granule" means


def _first_step(model, group, budget, loss=pg_loss, **kw):
    """The ``BudgetError`` of the first step of a fresh context with ``budget``, or ``None``."""
    try:
        with hbmplan.memory(model, hbm_budget=budget, **kw) as mem:
            mem.step([group], loss)
    except hbmplan.BudgetError as err:
        assert err.budget == budget
        return err
    finally:
        model.zero_grad(set_to_none=True)
    return None


def test_readme_example_error_names_a_budget_that_works():
    """The README's model and group (a probe, then a plan predicted before phase A that may
    recompute): the error used to name the minimum of a plan made after phase A, which cannot
    recompute, while a smaller budget ran the predicted plan."""
    torch.manual_seed(0)
    model = ReferenceDecoder(DecoderConfig(vocab_size=1000, hidden_size=128, num_layers=2,
                                           num_heads=4, num_kv_heads=2, intermediate_size=256))  # fmt: skip
    group = hbmplan.Group(
        torch.randint(0, 1000, (512,)),
        [torch.randint(0, 1000, (s,)) for s in (40, 7, 64, 1)],
        data={"advantages": group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0]))},
    )
    loss = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, aggregation="token-mean")
    kw = dict(loss=loss, tokens_per_microbatch=256)
    m = _first_step(model, group, 2**20, **kw).min_feasible
    assert _first_step(model, group, m, **kw) is None
    below = _first_step(model, group, m - GRANULE, **kw)
    assert below is not None and below.min_feasible == m, (m, below)


@given(
    prompt_len=st.sampled_from([40, 97, 2 * PROBE_TOKENS + 2, 300, 389, 450]),
    response_lens=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    layers=st.integers(1, 3),
    offload=st.sampled_from(["auto", "all"]),
    tokens_per_microbatch=st.sampled_from([None, 8, 24]),
    above=st.lists(st.integers(1, 2**22), min_size=1, max_size=2),
    seed=st.integers(0, 50),
)
@example(  # the shape of the README's failure: a probe, a predicted plan with recompute
    prompt_len=300, response_lens=[9, 3], layers=2, offload="auto",
    tokens_per_microbatch=None, above=[1], seed=0,
)  # fmt: skip
def test_budget_error_names_the_real_minimum(
    prompt_len, response_lens, layers, offload, tokens_per_microbatch, above, seed
):
    """First step of a fresh context: budget m = ``min_feasible`` passes, m - 512 B raises
    naming the same m, and budgets above m pass ("passes": no ``BudgetError``)."""
    model = tiny_reference(torch.float32, layers=layers, seed=seed % 5)
    group = random_group(prompt_len, response_lens, seed=seed, dtype=torch.float32)
    kw = dict(offload=offload, tokens_per_microbatch=tokens_per_microbatch)
    err = _first_step(model, group, 1, **kw)
    m = err.min_feasible
    assert _first_step(model, group, m, **kw) is None, m
    below = _first_step(model, group, m - GRANULE, **kw)
    assert below is not None and below.min_feasible == m, (m, below)
    for extra in above:
        assert _first_step(model, group, m + extra, **kw) is None, (m, extra)
