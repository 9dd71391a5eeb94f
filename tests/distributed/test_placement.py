"""hbmplan.distributed.assign: every group placed once, deterministic, within Graham's bound."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from hbmplan.distributed import assign, global_token_count
from tests.helpers import random_group, tiny_reference

shapes = st.lists(
    st.tuples(st.integers(2, 300), st.lists(st.integers(1, 60), min_size=1, max_size=6)),
    min_size=0,
    max_size=24,
)


@given(shapes, st.integers(1, 8))
@example([(10, [1])], 4)  # fewer groups than ranks: the others get none
def test_every_group_once_deterministic_and_within_the_bound(groups, world):
    placement = assign(groups, world)
    placed = sorted(i for idx in placement.ranks for i in idx)
    assert placed == list(range(len(groups)))
    assert placement == assign(groups, world)
    costs = [p + sum(lens) for p, lens in groups]
    assert sum(placement.costs) == sum(costs)
    if groups:
        mean = sum(costs) / world
        assert max(placement.costs) <= mean + max(costs)


def test_flops_and_peaks_from_the_model():
    model = tiny_reference()
    groups = [random_group(p, lens, seed=i) for i, (p, lens) in enumerate(
        [(40, [3, 9]), (12, [2]), (90, [20, 4, 4]), (30, [1, 1, 1])])]  # fmt: skip
    placement = assign(groups, 2, model)
    assert placement.unit == "FLOPs" and len(placement.peak_bytes) == 2
    assert all(b > 0 for b in placement.peak_bytes)
    assert placement.imbalance >= 1.0
    assert "imbalance" in str(placement)


def test_world_size_is_checked():
    with pytest.raises(ValueError, match="world_size"):
        assign([(4, [1])], 0)


def test_global_token_count_without_a_process_group_is_local():
    groups = [random_group(5, [2, 3]), random_group(7, [4])]
    assert global_token_count(groups) == 9
