"""A group changed after it was built is checked again at every step, with the same errors its
construction raises, before any gradient changes."""

from __future__ import annotations

import pytest
import torch

import hbmplan
from hbmplan.schedules import dense_step, reuse_step
from tests.helpers import pg_loss, random_group, tiny_reference


def _append_empty(g):
    g.responses.append(torch.zeros(0, dtype=torch.long))


def _shorten_prompt(g):
    g.prompt = g.prompt[:1]


def _float_response(g):
    g.responses[1] = g.responses[1].float()


def _responses_as_tensor(g):
    g.responses = g.responses[0]


def _no_responses(g):
    g.responses.clear()


def _data_list(g):
    g.data = [1.0, 2.0]


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (_append_empty, ValueError, r"responses must be non-empty, got response 3 of length 0 in groups\[1\]"),
        (_shorten_prompt, ValueError, r"prompt must have length >= 2 .*got length 1 in groups\[1\]"),
        (_float_response, TypeError, r"response 1 must hold integer token ids, got dtype torch.float32 in groups\[1\]"),
        (_responses_as_tensor, TypeError, r"responses must be a list of 1-D token tensors, got Tensor in groups\[1\]"),
        (_no_responses, ValueError, r"non-empty list \(G >= 1\), got 0 responses in groups\[1\]"),
        (_data_list, TypeError, r"data must be a mapping, got list in groups\[1\]"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("runner", ["memory", "reuse", "dense"])
def test_a_group_mutated_after_construction_is_rejected_at_step(mutate, exc, match, runner):
    model = tiny_reference()
    groups = [random_group(9, [3, 2], seed=1), random_group(7, [4, 1, 2], seed=2)]
    mutate(groups[1])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(exc, match=match):
        if runner == "memory":
            with hbmplan.memory(model) as mem:
                mem.step(groups, pg_loss)
        elif runner == "reuse":
            reuse_step(model, groups, pg_loss)
        else:
            dense_step(model, groups, pg_loss)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, before[n]), n


def test_a_valid_mutation_trains_and_responses_stay_a_list():
    """Re-checking changes nothing the user relies on: ``responses`` is the list built at
    construction (a tuple given is copied into one), and appending a valid response trains it."""
    model = tiny_reference()
    g = random_group(9, [3, 2], seed=1)
    g2 = hbmplan.Group(g.prompt, tuple(g.responses), g.data)
    assert isinstance(g2.responses, list)
    g.responses.append(torch.tensor([1, 2, 3]))
    g.data = {"advantages": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)}
    responses = g.responses
    with hbmplan.memory(model) as mem:
        stats = mem.step([g], pg_loss)
    assert stats.trajectories == 3 and g.responses is responses
