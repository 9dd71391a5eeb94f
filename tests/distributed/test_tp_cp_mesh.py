"""A 2 x 2 mesh (CP over TP, gloo): the reuse step with each prompt split over the CP dimension
of a model parallelised over the TP dimension gives the single-process dense gradients (fp64)."""

from __future__ import annotations

import pytest

from tests.distributed.tpcp_cases import mesh_world
from tests.helpers.dist import run_ranks

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]  # four ranks on the CPUs


def test_tp_cp_mesh_gradients_equal_dense():
    for rank in run_ranks(mesh_world, 4, timeout_s=200):
        assert rank["pass-q"] <= 1e-12 and rank["all-gather"] <= 1e-12, rank
