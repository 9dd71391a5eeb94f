"""The reuse step under FSDP2 and DDP on gloo ranks (tests/distributed/dp_cases.py runs the
cases): gradients equal single-process dense training on the union of all ranks' groups divided
by the world size, with unequal groups and microbatch counts per rank; both grad_sync modes;
sync=False accumulation; atomic failure across ranks; several optimizer steps; offload; HSDP.

One world per (engine, world size), every case inside it; each world is bounded in time."""

from __future__ import annotations

import pytest

from tests.distributed import dp_cases
from tests.helpers.dist import run_ranks

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore:.*view tensor")]

EXACT = 1e-12  # fp64, the reference decoder (single process: ~1e-15)
HF = 1e-6  # fp64 Hugging Face models, the single-process bound (fp32 RMSNorm and RoPE tables)


@pytest.fixture(scope="module")
def fsdp():
    return run_ranks(dp_cases.fsdp_world, 2, timeout_s=240, collective_s=60)


@pytest.fixture(scope="module")
def ddp():
    return run_ranks(dp_cases.ddp_world, 2, timeout_s=240, collective_s=60)


def _each(results, key):
    return [r[key] for r in results]


@pytest.mark.xdist_group("dp-fsdp")
@pytest.mark.parametrize(
    "case, bound",
    [("reference", EXACT), ("reference/every-microbatch", EXACT), ("qwen3", HF),
     ("llama/every-microbatch", HF)],
)  # fmt: skip
def test_fsdp2_equals_dense_on_the_union(fsdp, case, bound):
    assert all(d <= bound for d in _each(fsdp, case)), _each(fsdp, case)


@pytest.mark.xdist_group("dp-ddp")
@pytest.mark.parametrize("case, bound", [("reference", EXACT), ("qwen3", HF)])
def test_ddp_equals_dense_on_the_union(ddp, case, bound):
    assert all(d <= bound for d in _each(ddp, case)), _each(ddp, case)


@pytest.mark.xdist_group("dp-fsdp")
@pytest.mark.parametrize("case", ["accumulate", "accumulate/every-microbatch"])
def test_fsdp2_sync_false_accumulates_and_reduces_once(fsdp, case):
    for r in _each(fsdp, case):
        assert r["first"] == "none"  # nothing reduced into the sharded .grad by sync=False
        assert r["diff"] <= EXACT


@pytest.mark.xdist_group("dp-ddp")
def test_ddp_sync_false_keeps_local_gradients_then_averages_the_total(ddp):
    for r in _each(ddp, "accumulate"):
        assert r["first"].startswith("local ") and float(r["first"].split()[1]) <= EXACT
        assert r["diff"] <= EXACT


@pytest.mark.xdist_group("dp-fsdp")
@pytest.mark.parametrize("phase", ["B", "C", "early"])
def test_fsdp2_a_failure_on_one_rank_raises_everywhere_and_restores(fsdp, phase):
    _check_atomic(_each(fsdp, f"atomic/{phase}"))


@pytest.mark.xdist_group("dp-ddp")
@pytest.mark.parametrize("phase", ["B", "C", "early"])
def test_ddp_a_failure_on_one_rank_raises_everywhere_and_restores(ddp, phase):
    _check_atomic(_each(ddp, f"atomic/{phase}"))


def _check_atomic(results):
    ok_rank, failing_rank = results
    assert ok_rank["raised"] == "RankFailureError [1]"
    assert failing_rank["raised"].endswith("note=True")  # its own error, noted with the ranks
    for r in results:
        assert r["restored"]
        assert r["next"] <= EXACT


@pytest.mark.xdist_group("dp-fsdp")
def test_fsdp2_optimizer_steps_equal_dense_training(fsdp):
    assert all(d <= 1e-10 for d in _each(fsdp, "optimizer"))


@pytest.mark.xdist_group("dp-ddp")
def test_ddp_optimizer_steps_equal_dense_training(ddp):
    assert all(d <= 1e-10 for d in _each(ddp, "optimizer"))


@pytest.mark.xdist_group("dp-fsdp")
def test_fsdp2_offload_is_bitwise_equal_to_no_offload(fsdp):
    assert all(_each(fsdp, "offload"))


@pytest.mark.xdist_group("dp-fsdp")
def test_fsdp2_recompute_in_phase_c_is_bitwise_equal_to_no_offload(fsdp):
    assert _each(fsdp, "recompute") == [{"bitwise": True, "recomputed": True}] * 2


@pytest.mark.xdist_group("dp-fsdp")
@pytest.mark.parametrize("case", ["plain-after", "plain-after/no-reshard"])
def test_fsdp2_trains_with_its_own_hooks_after_hbmplan_steps(fsdp, case):
    assert all(d <= EXACT for d in _each(fsdp, case)), _each(fsdp, case)


@pytest.mark.xdist_group("dp-fsdp")
def test_unsupported_wrapping_is_refused_with_a_typed_error(fsdp):
    assert all(r == ["DataParallelError"] * 3 for r in _each(fsdp, "refusals"))


def test_four_ranks_hsdp_every_microbatch_equals_dense():
    results = run_ranks(dp_cases.hsdp_world, 4, timeout_s=240, collective_s=60)
    assert all(r["hsdp"] <= EXACT for r in results)


@pytest.mark.xdist_group("dp-fsdp")
def test_fsdp2_a_rank_without_groups_joins_with_no_work(fsdp):
    assert all(d <= EXACT for d in _each(fsdp, "empty-rank"))


@pytest.mark.xdist_group("dp-ddp")
def test_ddp_a_rank_without_groups_joins_with_no_work(ddp):
    assert all(d <= EXACT for d in _each(ddp, "empty-rank"))


def _check_skipping(results):
    """Rank 1's groups are all inert (its plan keeps no group), rank 0 skips one response: both
    join the same collectives and the gradients equal dense training without skipping."""
    assert all(r["skipping"]["diff"] <= EXACT for r in results)
    assert [r["skipping"]["skipped"] for r in results] == [1, 5]  # rank 1: all 5 responses


@pytest.mark.xdist_group("dp-fsdp")
def test_fsdp2_skipping_inert_responses_keeps_ranks_in_step(fsdp):
    _check_skipping(fsdp)


@pytest.mark.xdist_group("dp-ddp")
def test_ddp_skipping_inert_responses_keeps_ranks_in_step(ddp):
    _check_skipping(ddp)


@pytest.mark.xdist_group("dp-fsdp")
def test_global_token_count_sums_every_rank(fsdp):
    want = sum(sum(g.response_lens) for g in dp_cases.union(2))
    assert _each(fsdp, "tokens") == [want, want]


@pytest.mark.xdist_group("dp-fsdp")
def test_fsdp2_bf16_mixed_precision_by_the_tolerance_rule(fsdp):
    assert _each(fsdp, "bf16-mixed") == ["", ""]


@pytest.mark.xdist_group("dp-fsdp")
def test_the_readme_many_gpus_example_runs_on_two_ranks(fsdp):
    out = _each(fsdp, "readme")
    assert "data parallel: fsdp2, rank 0 of 2" in out[0]
    assert "data parallel: fsdp2, rank 1 of 2" in out[1]


@pytest.mark.xdist_group("dp-fsdp")
@pytest.mark.parametrize("case, bound", [("dense", HF), ("dense/every-microbatch", EXACT)])
def test_fsdp2_dense_step_equals_dense_on_the_union(fsdp, case, bound):
    assert all(d <= bound for d in _each(fsdp, case)), _each(fsdp, case)


@pytest.mark.xdist_group("dp-ddp")
def test_ddp_dense_step_equals_dense_on_the_union(ddp):
    assert all(d <= EXACT for d in _each(ddp, "dense"))


@pytest.mark.xdist_group("dp-fsdp")
@pytest.mark.parametrize("case", ["moe-global", "moe-global/empty-rank"])
def test_fsdp2_moe_global_batch_router_loss_counts_every_rank(fsdp, case):
    for r in _each(fsdp, case):
        assert r["reuse"] <= EXACT and r["dense"] <= EXACT, r


@pytest.mark.xdist_group("dp-fsdp")
def test_fsdp2_moe_a_rank_failing_before_its_counting_pass_raises_everywhere(fsdp):
    assert _each(fsdp, "moe-global/early") == ["RankFailureError [1]", "ValueError"]
