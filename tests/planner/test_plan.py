"""make_plan over random lifetimes, budgets and rates; Plan's JSON and summary; PlanCache."""

import dataclasses
import itertools
import json
import pickle
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hbmplan.errors import BudgetError
from hbmplan.planner.lifetimes import Lifetime
from hbmplan.planner.plan import Plan, PlanCache, PlanInputs, Rates, make_plan, predict
from hbmplan.planner.timeline import build_stages


def lt(i, nbytes, layer, hot=False):
    return Lifetime(i, nbytes, layer, "op", "torch.bfloat16", "A", ("B", "C") if hot else ("C",))


@st.composite
def rates(draw):
    def maybe(lo, hi):
        return draw(st.none() | st.floats(lo, hi))

    return Rates(
        d2h_gbps=draw(st.floats(0.5, 100.0)),
        h2d_gbps=draw(st.floats(0.5, 100.0)),
        copy_slowdown=draw(st.floats(1.0, 1.5)),
        forward_s=maybe(0.0, 2.0),
        responses_s=maybe(0.0, 5.0),
        backward_s=maybe(0.0, 4.0),
    )


@st.composite
def plan_inputs(draw, max_layers=5, max_per_layer=4, budget=None, mode="auto"):
    """Random layers (with stages outside the layers before and after), sizes, hot/dormant
    mixes, working sets, rates and allowed actions. ``mode=None`` draws the mode too."""
    if mode is None:
        mode = draw(st.sampled_from(["auto", "all"]))
    layers = list(range(draw(st.integers(1, max_layers))))
    layers = [None] * draw(st.integers(0, 1)) + layers + [None] * draw(st.integers(0, 1))
    lts = []
    for layer in layers:
        for _ in range(draw(st.integers(0, max_per_layer))):
            hot = draw(st.sampled_from([False, False, False, True]))
            lts.append(lt(len(lts), draw(st.integers(0, 2**30)), layer, hot))
    offload = True if mode == "all" else draw(st.booleans())
    return PlanInputs(
        lts,
        budget=budget,
        hot_extra_bytes=draw(st.integers(0, 2**28)),
        a_working_bytes=draw(st.integers(0, 2**28)),
        b_working_bytes=draw(st.integers(0, 2**28)),
        c_working_bytes=draw(st.integers(0, 2**28)),
        rates=draw(rates()),
        offload=offload,
        recompute=draw(st.booleans()),
        mode=mode,
    )


def with_budget(inputs, budget):
    return dataclasses.replace(inputs, budget=budget)


def bounds(inputs):
    """(smallest feasible budget, peak with everything kept)."""
    unlimited = make_plan(with_budget(inputs, None))
    return unlimited.min_feasible, max(unlimited.peak_bytes, unlimited.min_feasible)


def between(lo, hi, frac):
    return lo + int((hi - lo) * frac)


def check_plan(inputs, plan):
    """Invariants every plan meets: one decision per lifetime, hot keep, allowed actions only,
    the numbers predict() gives for its decisions, and a recompute covers a layer but its first
    dormant tensor."""
    assert set(plan.decisions) == {x.id for x in inputs.lifetimes}
    for x in inputs.lifetimes:
        if x.hot:
            assert plan.decisions[x.id] == "keep", f"hot lifetime {x.id} must stay on device"
    used = set(plan.decisions.values())
    if not inputs.offload:
        assert "offload" not in used
    if not inputs.recompute or inputs.mode == "all":
        assert "recompute" not in used
    again = predict(inputs, plan.decisions, plan.offload_lag, plan.prefetch_depth)
    assert (again.peak_a_bytes, again.peak_b_bytes, again.peak_c_bytes) == (
        plan.peak_a_bytes,
        plan.peak_b_bytes,
        plan.peak_c_bytes,
    )
    assert (again.exposed_ab_s, again.exposed_c_s) == (plan.exposed_ab_s, plan.exposed_c_s)
    sizes = {x.id: x.nbytes for x in inputs.lifetimes}
    for d, total in [("offload", plan.offload_bytes), ("recompute", plan.recompute_bytes)]:
        assert total == sum(sizes[i] for i, v in plan.decisions.items() if v == d)
    assert plan.keep_bytes + plan.offload_bytes + plan.recompute_bytes == sum(sizes.values())


@given(plan_inputs(), st.floats(0.0, 1.0))
def test_plan_fits_a_feasible_budget_and_never_moves_hot_tensors(inputs, frac):
    lo, hi = bounds(inputs)
    budget = between(lo, hi, frac)
    plan = make_plan(with_budget(inputs, budget))
    assert max(plan.peak_a_bytes, plan.peak_b_bytes, plan.peak_c_bytes) <= budget
    assert plan.budget == budget and plan.min_feasible == lo
    check_plan(inputs, plan)


@given(plan_inputs(mode=None))
def test_budget_error_exactly_below_the_smallest_feasible_budget(inputs):
    lo, _ = bounds(inputs)
    plan = make_plan(with_budget(inputs, lo))
    assert plan.peak_bytes == lo  # no plan peaks below it, so a plan that fits peaks at it
    with pytest.raises(BudgetError) as err:
        make_plan(with_budget(inputs, lo - 1))
    assert err.value.budget == lo - 1
    assert err.value.min_feasible == lo
    assert str(lo) in str(err.value) and str(lo - 1) in str(err.value)
    assert isinstance(err.value, ValueError)


def all_decision_sets(inputs):
    """Every valid decision set under the inputs' allowed actions (small inputs only)."""
    stages, _ = build_stages(inputs.lifetimes, inputs.rates)
    per_stage = []
    for s in stages:
        ids = [i for i, _ in s.dormant]
        moves = ["keep", "offload"] if inputs.offload else ["keep"]
        options = [
            dict(zip(ids, c, strict=True)) for c in itertools.product(moves, repeat=len(ids))
        ]
        if inputs.recompute and s.recomputable:
            options += [{ids[0]: m, **{i: "recompute" for i in ids[1:]}} for m in moves]
        per_stage.append(options)
    for combo in itertools.product(*per_stage):
        yield {k: v for d in combo for k, v in d.items()}


@given(plan_inputs(max_layers=2, max_per_layer=3))
def test_no_plan_at_all_fits_below_the_smallest_feasible_budget(inputs):
    """Brute force over every decision set, lag and depth: min_feasible is the true minimum."""
    lo, _ = bounds(inputs)
    n = len(build_stages(inputs.lifetimes, inputs.rates)[0])
    lowest = min(
        predict(inputs, d, lag, depth).peak_bytes
        for d in all_decision_sets(inputs)
        for lag in range(1, max(n, 1) + 1)
        for depth in range(1, max(n, 1) + 1)
    )
    assert lowest == lo


@given(plan_inputs())
def test_no_budget_keeps_everything(inputs):
    plan = make_plan(with_budget(inputs, None))
    assert set(plan.decisions.values()) <= {"keep"}
    assert plan.offload_bytes == plan.recompute_bytes == 0
    assert plan.exposed_s == 0.0 and plan.prefetch_depth == plan.offload_lag == 0
    check_plan(inputs, plan)


@given(plan_inputs(mode="all"), st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_mode_all_offloads_every_dormant_tensor(inputs, frac):
    lo, hi = bounds(inputs)
    budget = None if frac is None else between(lo, hi, frac)
    plan = make_plan(with_budget(inputs, budget))
    for x in inputs.lifetimes:
        assert plan.decisions[x.id] == ("keep" if x.hot else "offload")
    if budget is not None:
        assert plan.peak_bytes <= budget
    check_plan(inputs, plan)


@given(plan_inputs(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_more_budget_never_increases_exposed_time(inputs, f1, f2):
    lo, hi = bounds(inputs)
    small, large = sorted([between(lo, hi, f1), between(lo, hi, f2)])
    tight = make_plan(with_budget(inputs, small))
    loose = make_plan(with_budget(inputs, large))
    # 1e-12 s: the same schedule summed in a different order may differ in the last bit.
    assert loose.exposed_s <= tight.exposed_s + 1e-12
    assert make_plan(with_budget(inputs, hi)).exposed_s == 0.0  # everything kept fits


@given(plan_inputs(), st.floats(0.0, 1.0))
def test_json_round_trip_and_summary(inputs, frac):
    lo, hi = bounds(inputs)
    plan = make_plan(with_budget(inputs, between(lo, hi, frac)))
    text = plan.to_json()
    assert isinstance(json.loads(text), dict)  # plain JSON
    assert Plan.from_json(text) == plan
    summary = str(plan)
    mib = 2**20
    for number in [plan.peak_a_bytes, plan.peak_b_bytes, plan.peak_c_bytes, plan.offload_bytes]:
        assert f"{number / mib:.1f}" in summary
    assert f"{plan.exposed_s * 1e3:.3f} ms" in summary
    counts = {d: list(plan.decisions.values()).count(d) for d in ("keep", "offload", "recompute")}
    for d, c in counts.items():
        assert any(line.split()[:2] == [d, str(c)] for line in summary.splitlines())


def test_from_json_rejects_unknown_decisions():
    plan = make_plan(PlanInputs([lt(0, 10, 0)]))
    bad = plan.to_json().replace('"keep"', '"drop"')
    with pytest.raises(ValueError, match="drop"):
        Plan.from_json(bad)


@given(plan_inputs(), st.floats(0.0, 1.0), st.randoms(use_true_random=False))
def test_same_inputs_same_plan(inputs, frac, rnd):
    lo, hi = bounds(inputs)
    inputs = with_budget(inputs, between(lo, hi, frac))
    shuffled = list(inputs.lifetimes)
    rnd.shuffle(shuffled)
    assert make_plan(inputs) == make_plan(dataclasses.replace(inputs, lifetimes=shuffled))


def layered(n_layers=4, sizes=(10**9, 10**9, 10**9), **kw):
    lts = []
    for layer in range(n_layers):
        lts.append(lt(len(lts), 10**6, layer, hot=True))
        lts += [lt(len(lts) + j, b, layer) for j, b in enumerate(sizes)]
    return PlanInputs(lts, **kw)


def test_slow_link_recomputes_and_fast_link_offloads():
    timing = dict(forward_s=0.4, responses_s=1.2, backward_s=0.8)
    slow = layered(rates=Rates(d2h_gbps=0.1, h2d_gbps=0.1, **timing))
    lo, hi = bounds(slow)
    plan = make_plan(with_budget(slow, (lo + hi) // 2))
    assert plan.recompute_bytes > 0 and plan.offload_bytes < plan.recompute_bytes
    fast = layered(rates=Rates(d2h_gbps=1000.0, h2d_gbps=1000.0, **timing))
    plan = make_plan(with_budget(fast, (lo + hi) // 2))
    assert plan.offload_bytes > 0 and plan.recompute_bytes == 0
    assert plan.exposed_s < 0.01  # 1 GB copies of 1 ms hide behind 100 ms layers


def test_offload_alone_and_recompute_alone():
    inputs = layered(rates=Rates(forward_s=0.4, responses_s=1.2, backward_s=0.8))
    no_recompute = dataclasses.replace(inputs, recompute=False)
    lo, hi = bounds(no_recompute)
    plan = make_plan(with_budget(no_recompute, lo))
    assert plan.recompute_bytes == 0 and plan.offload_bytes > 0
    no_offload = dataclasses.replace(inputs, offload=False)
    lo2, _ = bounds(no_offload)
    plan = make_plan(with_budget(no_offload, lo2))
    assert plan.offload_bytes == 0 and plan.recompute_bytes > 0
    neither = dataclasses.replace(inputs, offload=False, recompute=False)
    with pytest.raises(BudgetError):
        make_plan(with_budget(neither, hi - 1))


def test_min_feasible_by_hand():
    # Same shapes as test_timeline.test_peaks_by_hand: recompute layers 0 and 1 (checkpoints 10
    # and 30 offloaded), offload 50. A: 3 hot + stages 1..2 in flight (80); B: 103 + 50 in
    # flight; C: 103 + max(10+20, 30+40+10, 50+30).
    lts = [lt(0, 1, 0, hot=True), lt(1, 10, 0), lt(2, 20, 0)]
    lts += [lt(3, 2, 1, hot=True), lt(4, 30, 1), lt(5, 40, 1), lt(6, 50, 2)]
    kw = dict(hot_extra_bytes=100, a_working_bytes=1000, b_working_bytes=2000)
    inputs = PlanInputs(lts, c_working_bytes=3000, **kw)
    assert make_plan(inputs).min_feasible == 103 + 80 + 3000
    with pytest.raises(BudgetError, match="3183 bytes"):
        make_plan(with_budget(inputs, 3182))
    plan = make_plan(with_budget(inputs, 3183))
    assert plan.decisions == {0: "keep", 1: "offload", 2: "recompute", 3: "keep", 4: "offload",
                              5: "recompute", 6: "offload"}  # fmt: skip


def test_plan_cache_reuses_same_shapes_and_replans_new_ones():
    cache = PlanCache(maxsize=2)
    a = layered(budget=None)
    first = cache.plan(a)
    # Same shapes, new rates and new Lifetime objects: reuse.
    same = layered(budget=None, rates=Rates(d2h_gbps=1.0))
    assert cache.plan(same) is first
    assert (cache.hits, cache.misses) == (1, 1)
    lo, _ = bounds(a)
    tighter = cache.plan(with_budget(a, lo))
    assert tighter is not first and tighter.budget == lo
    longer = cache.plan(layered(n_layers=5))
    assert (cache.hits, cache.misses, len(cache)) == (1, 3, 2)
    assert cache.plan(a) is not first  # evicted (least recently used), planned again
    assert longer.decisions.keys() != first.decisions.keys()
    with pytest.raises(BudgetError):
        cache.plan(with_budget(a, lo - 1))


def test_budget_error_pickles_with_its_numbers():
    err = pickle.loads(pickle.dumps(BudgetError(5, 7, "why")))
    assert (err.budget, err.min_feasible, err.detail) == (5, 7, "why")
    assert "7 bytes" in str(err) and "got 5 bytes" in str(err)


def test_rates_from_step_and_ceilings():
    phase = type("Phase", (), {})
    stats = type("Stats", (), {})()
    stats.phases = {}
    for name, sec in [("A", 0.5), ("B", 2.0), ("C", 1.0)]:
        stats.phases[name] = phase()
        stats.phases[name].seconds = sec
    r = Rates.from_step(stats, d2h_gbps=40.0)
    assert (r.forward_s, r.responses_s, r.backward_s, r.d2h_gbps) == (0.5, 2.0, 1.0, 40.0)
    del stats.phases["C"]
    with pytest.raises(ValueError, match="missing"):
        Rates.from_step(stats)
    ceilings = {"h2d_pinned_GBps": 55.5, "d2h_pinned_GBps": 55.3, "bidir_GBps_total": 98.2,
                "gemm_slowdown_under_d2h": 1.113}  # fmt: skip
    assert Rates.from_ceilings(ceilings) == Rates()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d2h_gbps=0.0), "d2h_gbps"),
        (dict(copy_slowdown=0.9), "copy_slowdown"),
        (dict(forward_s=-1.0), "forward_s"),
        (dict(layer_backward_s=(1.0, -1.0)), "layer_backward_s"),
    ],
)
def test_rates_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Rates(**kwargs)


def test_inputs_and_predict_reject_bad_values():
    lts = [lt(0, 10, 0, hot=True), lt(1, 10, 0), lt(2, 10, 0), lt(3, 10, None), lt(4, 10, None)]
    with pytest.raises(ValueError, match="offload=True"):
        PlanInputs(lts, mode="all", offload=False)
    with pytest.raises(ValueError, match="unique"):
        PlanInputs([lt(0, 1, 0), lt(0, 2, 0)])
    with pytest.raises(TypeError, match="budget"):
        PlanInputs(lts, budget=1.5)
    with pytest.raises(ValueError, match="b_working_bytes"):
        PlanInputs(lts, b_working_bytes=-1)
    inputs = PlanInputs(lts)
    with pytest.raises(ValueError, match="hot"):
        predict(inputs, {0: "offload"}, 1, 1)
    with pytest.raises(ValueError, match="checkpoint"):
        predict(inputs, {1: "recompute", 2: "recompute"}, 1, 1)  # checkpoint 1 recomputed
    with pytest.raises(ValueError, match="checkpoint"):
        predict(inputs, {4: "recompute"}, 1, 1)  # outside the layers: nothing to recompute
    with pytest.raises(ValueError, match="lag"):
        predict(inputs, {1: "offload"}, 0, 1)
    assert predict(inputs, {2: "recompute"}, 1, 1).exposed_c_s > 0


def test_planning_32_layers_fits_the_budget():
    """A Llama3-8B-like capture (32 layers, 17 storages each) plans within the budget; how long
    that takes is a benchmark (tools/bench_planner.py), not a test."""
    rng = random.Random(0)
    sizes = [rng.choice([2, 4, 7]) * 2**26 for _ in range(15)]
    inputs = layered(n_layers=32, sizes=sizes)
    lo, hi = bounds(inputs)
    plan = make_plan(with_budget(inputs, (lo + hi) // 3))
    assert plan.peak_bytes <= (lo + hi) // 3
