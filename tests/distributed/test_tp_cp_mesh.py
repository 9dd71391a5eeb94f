"""2 x 2 meshes (gloo): CP over TP, and FSDP2 data parallel over TP and over CP. The reuse step
gives the single-process dense gradients (fp64): on the same groups for CP x TP, on the union of
the DP ranks' groups divided by the DP degree for DP x TP and DP x CP."""

from __future__ import annotations

import pytest

from tests.distributed.tpcp_cases import dp_mesh_world, mesh_world
from tests.helpers.dist import run_ranks

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]  # four ranks on the CPUs


def test_tp_cp_mesh_gradients_equal_dense():
    for rank in run_ranks(mesh_world, 4, timeout_s=200):
        assert rank["pass-q"] <= 1e-12 and rank["all-gather"] <= 1e-12, rank


def test_fsdp2_data_parallel_over_tp_and_over_cp_equals_dense_on_the_union():
    for rank in run_ranks(dp_mesh_world, 4, timeout_s=200):
        for key in ("dp-tp/phase-c", "dp-tp/every-microbatch", "dp-cp/pass-q", "dp-cp/all-gather"):
            assert rank[key] <= 1e-12, (key, rank)
        for refused in ("dp-cp/every-microbatch", "dp-cp/ddp"):  # typed, before any state changes
            assert rank[refused].startswith("DataParallelError"), (refused, rank)
