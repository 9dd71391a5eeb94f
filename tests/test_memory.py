"""The memory context: atomic steps, released buffers, the model left as found, the report."""

from __future__ import annotations

import re
import weakref

import pytest
import torch

import hbmplan
from hbmplan.schedules import dense_step, grad_cache
from tests.helpers import grads_of, max_rel_diff, pg_loss, random_group, tiny_reference


def _snapshot_grads(model):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def _assert_grads(model, snap):
    for n, p in model.named_parameters():
        if snap[n] is None:
            assert p.grad is None, f"{n}: .grad was None before the failed step"
        else:
            assert torch.equal(p.grad, snap[n]), f"{n}: .grad changed by the failed step"


def _failing_loss(fail_on_call: int, error: BaseException):
    calls = {"n": 0}

    def loss(lp, g, i):
        calls["n"] += 1
        if calls["n"] == fail_on_call:
            raise error
        return pg_loss(lp, g, i)

    return loss


@pytest.mark.parametrize("initial", ["none", "some"])
@pytest.mark.parametrize(
    "error",
    [RuntimeError("late failure"), torch.OutOfMemoryError("CUDA out of memory (simulated)")],
)
def test_failed_step_restores_grads_exactly(initial, error):
    model = tiny_reference()
    if initial == "some":  # a parameter with a grad and one without
        for i, p in enumerate(model.parameters()):
            p.grad = torch.randn_like(p) if i % 2 else None
    snap = _snapshot_grads(model)
    group = random_group(10, [2, 3, 4, 1], seed=1)
    # fail on the third response: two microbatches have already run backward
    with pytest.raises(type(error), match=re.escape(str(error))), hbmplan.memory(model) as mem:
        mem.step([group], _failing_loss(3, error))
    _assert_grads(model, snap)
    assert mem.report().failed_steps == 1 and mem.report().steps == 0


def test_failure_in_second_group_after_first_completed_restores_all():
    model = tiny_reference()
    snap = _snapshot_grads(model)
    groups = [random_group(6, [2, 2], seed=2), random_group(7, [3], seed=3)]
    with pytest.raises(ValueError, match="boom"), hbmplan.memory(model) as mem:
        mem.step(groups, _failing_loss(3, ValueError("boom")))
    _assert_grads(model, snap)


def test_non_finite_loss_checked_and_rolled_back():
    model = tiny_reference()
    snap = _snapshot_grads(model)
    group = random_group(6, [2, 3], seed=4)

    def nan_loss(lp, g, i):
        return pg_loss(lp, g, i) * (float("nan") if i == 1 else 1.0)

    with pytest.raises(FloatingPointError, match="loss must be finite.*got nan for response 1"):
        with hbmplan.memory(model, check_finite=True) as mem:
            mem.step([group], nan_loss)
    _assert_grads(model, snap)


@pytest.mark.parametrize(
    "bad, exc, match",
    [(lambda lp, g, i: lp, TypeError, r"loss_fn must return a scalar tensor, got \(\d+,\)"),
     (lambda lp, g, i: 3.0, TypeError, "got float"),
     (lambda lp, g, i: torch.tensor(1.0), ValueError, "depends on logprobs, got a constant")],
)  # fmt: skip
def test_bad_loss_rejected_and_rolled_back(bad, exc, match):
    model = tiny_reference()
    snap = _snapshot_grads(model)
    with pytest.raises(exc, match=match), hbmplan.memory(model) as mem:
        mem.step([random_group(5, [3, 2], seed=5)], bad)
    _assert_grads(model, snap)


def test_failed_step_releases_the_gradient_cache(monkeypatch):
    caches: list[weakref.ref] = []
    original = grad_cache.GradientCache.__init__

    def tracking_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        caches.extend(weakref.ref(t) for pair in self.grads for t in pair)
        caches.extend(weakref.ref(t) for pair in self.prompt_kv for t in pair)

    monkeypatch.setattr(grad_cache.GradientCache, "__init__", tracking_init)
    model = tiny_reference()
    with pytest.raises(RuntimeError, match="late"), hbmplan.memory(model) as mem:
        mem.step([random_group(9, [2, 3, 4], seed=6)], _failing_loss(3, RuntimeError("late")))
    assert caches, "the gradient cache was never built"
    alive = [r for r in caches if r() is not None]
    assert not alive, f"{len(alive)} gradient-cache / prompt K/V tensors outlived the failed step"


def test_atomic_off_leaves_partial_grads():
    model = tiny_reference()
    with pytest.raises(RuntimeError), hbmplan.memory(model, atomic=False) as mem:
        mem.step([random_group(9, [2, 3, 4], seed=7)], _failing_loss(3, RuntimeError("x")))
    assert any(p.grad is not None for p in model.parameters())


def test_step_accumulates_onto_existing_grads():
    model = tiny_reference()
    group = random_group(9, [2, 5], seed=8)
    initial = {n: torch.randn_like(p) for n, p in model.named_parameters()}

    def dense():
        for n, p in model.named_parameters():
            p.grad = initial[n].clone()
        dense_step(model, [group], pg_loss)

    def reuse():
        for n, p in model.named_parameters():
            p.grad = initial[n].clone()
        with hbmplan.memory(model) as mem:
            mem.step([group], pg_loss)

    assert max_rel_diff(grads_of(model, reuse), grads_of(model, dense)) <= 1e-12


def _model_state(model):
    return (
        {n: m.training for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: (len(m._forward_pre_hooks), len(m._forward_hooks), len(m._backward_hooks))
         for n, m in model.named_modules()},
        {n: t.clone() for n, t in model.state_dict().items()},
    )  # fmt: skip


def _same_state(a, b):
    return a[:3] == b[:3] and all(torch.equal(a[3][k], b[3][k]) for k in a[3])


@pytest.mark.parametrize("fail", [False, True])
def test_model_left_exactly_as_found(fail):
    model = tiny_reference()
    model.layers[1].eval()
    model.embed.weight.requires_grad_(False)
    before = _model_state(model)
    loss = _failing_loss(2, KeyError("k")) if fail else pg_loss
    try:
        with hbmplan.memory(model) as mem:
            mem.step([random_group(6, [2, 3], seed=9)], loss)
            model.train()  # even what the caller changes inside the block is put back
    except KeyError:
        assert fail
    assert _same_state(before, _model_state(model))


def test_report_reports_phases_and_bytes():
    model = tiny_reference()
    P, lens = 21, [3, 4, 2]
    with hbmplan.memory(model, tokens_per_microbatch=8) as mem:
        stats = mem.step([random_group(P, lens, seed=10)], pg_loss)
    rep = mem.report()
    assert rep.steps == 1 and rep.last is stats
    cfg = model.cfg
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * (P - 1) * cfg.dim * 8  # fp64
    assert stats.prompt_kv_bytes == kv and stats.grad_cache_bytes == kv
    assert list(stats.phases) == ["A", "B", "C"]
    assert all(p.seconds > 0 for p in stats.phases.values())
    # phase B holds the prompt graph, the gradient cache and a microbatch's activations
    assert stats.phases["B"].peak_bytes > stats.phases["A"].peak_bytes + kv
    assert stats.microbatches == 2 and stats.trajectories == 3
    text = str(rep)
    for word in ("A ", "B ", "C ", "prompt K/V", "gradient cache", "held-tensors"):
        assert word in text


def test_step_outside_context_and_reentry():
    model = tiny_reference()
    mem = hbmplan.memory(model)
    with pytest.raises(RuntimeError, match="inside `with hbmplan.memory"):
        mem.step([random_group(4, [1])], pg_loss)
    with mem, pytest.raises(RuntimeError, match="already active"):
        mem.__enter__()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [(dict(offload="sometimes"), ValueError, "offload must be 'auto', 'off' or 'all', got 'sometimes'"),
     (dict(hbm_budget="lots"), ValueError, "byte size must look like '80GiB'"),
     (dict(hbm_budget=-5), ValueError, "must be positive, got -5"),
     (dict(grad_cache_dtype=torch.int32), TypeError, "floating torch.dtype, got torch.int32")],
)  # fmt: skip
def test_memory_arguments_checked(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        hbmplan.memory(tiny_reference(), **kwargs)


def test_parse_bytes():
    from hbmplan.memory import parse_bytes

    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes(4096) == 4096
