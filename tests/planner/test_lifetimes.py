"""Rescaling a capture to a new prompt length, and the working sets the planner is given."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hbmplan.planner import Lifetime, layer_working_bytes, phase_b_working_bytes, rescale


def lt(i, nbytes, layer=0):
    return Lifetime(i, nbytes, layer, "op", "torch.float32", "A", ("C",))


@given(
    tokens=st.integers(2, 64),
    new=st.integers(1, 200),
    other=st.integers(1, 7).filter(lambda d: d != 1),
    rest=st.integers(0, 1000),
)
def test_bytes_scale_by_the_power_of_the_sequence_dims(tokens, new, other, rest):
    """[P, d] scales linearly, [P, P] quadratically, [d] not at all; bytes of the storage beyond
    the saved view stay."""
    other = other if other != tokens else tokens + 1
    shapes = {0: (tokens, other), 1: (tokens, tokens), 2: (other,)}
    tensors = {i: (s, 4 * _prod(s)) for i, s in shapes.items()}
    lifetimes = [lt(i, tensors[i][1] + rest) for i in shapes]
    got = {x.id: x.nbytes for x in rescale(lifetimes, tensors, tokens, new)}
    assert got[0] == rest + 4 * new * other
    assert got[1] == rest + 4 * new * new
    assert got[2] == rest + 4 * other
    assert [x.id for x in rescale(lifetimes, tensors, tokens, tokens)] == [0, 1, 2]
    assert {x.id: x.nbytes for x in rescale(lifetimes, tensors, tokens, tokens)} == {
        x.id: x.nbytes for x in lifetimes
    }


def _prod(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def test_a_dim_equal_to_the_length_by_chance_scales_too():
    """Why a prediction is checked against the real capture: a head dim equal to P - 1 is taken
    for the sequence dim."""
    tensors = {0: ((16, 16), 4 * 256)}
    (x,) = rescale([lt(0, 1024)], tensors, 16, 32)
    assert x.nbytes == 4 * 32 * 32  # the true [32, 16] would be half


def test_rescale_rejects_empty_lengths():
    with pytest.raises(ValueError, match="token counts must be >= 1, got 0 and 5"):
        rescale([], {}, 0, 5)


def test_working_sets():
    lts = [lt(0, 10, 0), lt(1, 5, 0), lt(2, 12, 1), lt(3, 3, None)]
    assert layer_working_bytes(lts) == 15 and layer_working_bytes([]) == 0
    shapes = [(1, 10, 100), (4, 20, 50)]  # (rows, tokens, log-prob bytes)
    assert phase_b_working_bytes(2.0, shapes, kv_bytes=7, kv_copies=False) == max(120, 90)
    assert phase_b_working_bytes(2.0, shapes, kv_bytes=7, kv_copies=True) == 40 + 56 + 50
    assert phase_b_working_bytes(2.0, [], 7, True) == 0
