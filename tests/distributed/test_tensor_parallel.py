"""Tensor parallel (DTensor, TP=2 on gloo): the reuse step on parallelised models equals
single-process dense (fp64), through one step and three AdamW steps; the layouts it cannot run
exactly are refused with ParallelLayoutError. One world runs every case
(:func:`tests.distributed.tpcp_cases.tp_world`)."""

from __future__ import annotations

import pytest

from tests.distributed.tpcp_cases import tp_world
from tests.helpers.dist import run_ranks, shared_result

pytestmark = [pytest.mark.xdist_group("tp"), pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    def world():
        ckpt = str(tmp_path_factory.mktemp("tp"))
        ranks = run_ranks(tp_world, 2, args=(ckpt,), timeout_s=200)
        assert ranks[0].keys() == ranks[1].keys()
        return ranks[0]

    return shared_result(tmp_path_factory, "tp_world", world)


@pytest.mark.parametrize(
    ("case", "bound"),
    [("reference/padded", 1e-12), ("reference/reference", 1e-12), ("Llama/plan/reference", 1e-6),
     ("Qwen3/plan/reference", 1e-6), ("Llama/hf_tp_plan/reference", 1e-6)],
)  # fmt: skip
def test_tp_gradients_equal_dense(tp, case, bound):
    assert tp[case] <= bound


def test_each_rank_holds_its_own_kv_heads(tp):
    assert tp["reference/local_kv_heads"] == 1  # 2 K/V heads over 2 ranks


def test_tp_adamw_steps_equal_dense(tp):
    assert tp["reference/adamw3"] <= 1e-10


def test_kv_heads_not_divisible_are_refused(tp):
    for case in ("kv_heads/parallelize", "kv_heads/step"):
        assert tp[case].startswith("ParallelLayoutError: K/V heads must be divisible"), tp[case]


def test_hf_tp_plan_runs_on_cpu(tp):
    assert tp["Llama/hf_tp_plan/sharded"] == tp["Qwen3/hf_tp_plan/sharded"] == "DTensor"


def test_qwen3_norm_traps_are_refused(tp):
    hf = tp["Qwen3/hf_tp_plan/refused"]
    assert hf.startswith("ParallelLayoutError: per-head norm") and "over-counts" in hf
    plain = tp["Qwen3/projections_only"]
    assert plain.startswith("ParallelLayoutError: per-head norm") and "partial sum" in plain
    assert "SequenceParallel(sequence_dim=2" in plain
    # the trap is the plan's: plain dense training gets q_norm's gradient wrong under it too
    assert tp["Qwen3/projections_only/dense_q_norm"] > 0.1


def test_offload_is_refused_under_tp(tp):
    assert tp["reference/offload"].startswith("ValueError: offload")
