"""Offload is invisible in the numbers and keeps the schedule inside its budget."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hbmplan
from hbmplan.allocator import PoolExhaustedError
from hbmplan.schedules import offload as offload_mod
from tests.helpers import grads_of, pg_loss, random_group, tiny_hf, tiny_reference


def _steps(model, groups_per_step, **kw):
    """Grads after running every step in one context, and the context."""
    box = {}

    def run():
        with hbmplan.memory(model, tokens_per_microbatch=16, **kw) as mem:
            box["stats"] = [mem.step(groups, pg_loss) for groups in groups_per_step]
        box["mem"] = mem

    return grads_of(model, run), box


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["reference", "Qwen3"])
def test_offload_all_is_bitwise_same_as_without(kind, dtype):
    model = tiny_reference(dtype, layers=3) if kind == "reference" else tiny_hf("Qwen3", dtype)
    groups = [random_group(40, [5, 9, 3, 7], seed=1, dtype=torch.float32)]
    steps = [groups, groups, [random_group(23, [4, 2], seed=2, dtype=torch.float32)]]
    base, _ = _steps(model, steps, offload="off")
    moved, box = _steps(model, steps, offload="all")
    assert _equal(moved, base)
    first, second, new_shape = box["stats"]
    for s in box["stats"]:
        assert s.offload.engine.bytes_offloaded > 0
    assert not first.offload.streamed and second.offload.streamed  # planned, then streamed
    assert not new_shape.offload.streamed  # a new shape is planned from its own capture
    # everything dormant was offloaded: phase B holds much less than without offload
    _, plain = _steps(model, [groups], offload="off")
    assert second.phases["B"].peak_bytes < 0.7 * plain["stats"][0].phases["B"].peak_bytes


def test_all_offloaded_storages_come_back_and_the_pool_is_released():
    model = tiny_reference(torch.float32, layers=3)
    groups = [random_group(30, [3, 6], seed=3, dtype=torch.float32)]
    with hbmplan.memory(model, offload="all") as mem:
        stats = mem.step(groups, pg_loss)
        engine = mem._offloader._engine
        assert engine.live_handles == 0
        assert engine.pool.stats().used == 0
        # what backward never unpacks (e.g. a saved operand whose gradient is not needed) is
        # discarded, never reloaded
        e = stats.offload.engine
        assert 0 < e.bytes_prefetched <= e.bytes_offloaded
    assert mem._offloader._pool is None  # given back on exit
    assert "offloaded" in str(mem.report()) and "hbmplan plan (all)" in str(mem.report())


@given(fraction=st.floats(0.0, 1.0), seed=st.integers(0, 100))
def test_budget_is_respected_or_refused(fraction, seed):
    model = tiny_reference(torch.float32, layers=3, seed=seed % 5)
    groups = [random_group(48, [6, 2, 9], seed=seed, dtype=torch.float32)]
    _, plain = _steps(model, [groups], offload="off")
    no_offload_peak = max(p.peak_bytes for p in plain["stats"][0].phases.values())
    budget = int(no_offload_peak * fraction) + 1
    try:
        got, box = _steps(model, [groups, groups], hbm_budget=budget)
    except hbmplan.BudgetError as err:
        assert err.budget == budget and err.min_feasible > budget
        assert f"got {budget} bytes" in str(err)
        return
    ref, _ = _steps(model, [groups, groups], offload="off")
    assert _equal(got, ref)
    for stats in box["stats"]:
        for name in ("B", "C"):
            assert stats.phases[name].peak_bytes <= budget, (name, stats.phases[name], budget)
        assert stats.offload.plan.peak_bytes <= budget


def test_budget_error_leaves_grads_and_smallest_budget_works():
    model = tiny_reference(torch.float32, layers=2)
    groups = [random_group(40, [4, 4], seed=4, dtype=torch.float32)]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(hbmplan.BudgetError) as info, hbmplan.memory(model, hbm_budget=1000) as m:
        m.step(groups, pg_loss)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    with hbmplan.memory(model, hbm_budget=info.value.min_feasible) as mem:
        stats = mem.step(groups, pg_loss)
    assert stats.offload.plan.offload_bytes > 0


def test_offload_off_with_budget_only_checks_it():
    model = tiny_reference(torch.float32, layers=2)
    groups = [random_group(40, [4, 4], seed=5, dtype=torch.float32)]
    with pytest.raises(hbmplan.BudgetError), hbmplan.memory(model, 20_000, offload="off") as m:
        m.step(groups, pg_loss)


def test_host_pool_exhausted_mid_step_restores_grads_and_releases_the_pool(monkeypatch):
    model = tiny_reference(torch.float32, layers=3)
    groups = [random_group(40, [5, 3], seed=6, dtype=torch.float32)]
    before = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = before[n].clone()
    real_pool = offload_mod.HostPool
    monkeypatch.setattr(offload_mod, "HostPool", lambda n, **kw: real_pool(n // 3, **kw))
    with hbmplan.memory(model, offload="all") as mem:
        with pytest.raises(PoolExhaustedError, match="host pool exhausted: requested"):
            mem.step(groups, pg_loss)
        assert mem._offloader._pool is None and mem._offloader._engine is None
        for n, p in model.named_parameters():
            assert torch.equal(p.grad, before[n]), n
        monkeypatch.setattr(offload_mod, "HostPool", real_pool)
        mem.step(groups, pg_loss)  # the context recovers: a fresh pool, a full step
    assert mem.report().failed_steps == 1 and mem.report().steps == 1
