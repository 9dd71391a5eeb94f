"""The timeline model on small cases computed by hand, and the simulator's monotonicity."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hbmplan.planner.lifetimes import Lifetime
from hbmplan.planner.plan import PlanInputs, predict
from hbmplan.planner.timeline import Rates, build_stages, peaks, simulate

S = 1.113  # GEMM slowdown under D2H on the H200


def lt(i, nbytes, layer, hot=False):
    return Lifetime(i, nbytes, layer, "op", "torch.bfloat16", "A", ("B", "C") if hot else ("C",))


def one_tensor(nbytes, **rates):
    rates = Rates(d2h_gbps=55.0, h2d_gbps=55.0, copy_slowdown=S, **rates)
    return PlanInputs([lt(0, nbytes, 0)], rates=rates)


def test_offload_longer_than_compute_exposes_the_difference():
    # 55 GB at 55 GB/s is 1 s of copy; 0.5 s of phase B compute (slowed to 0.5565 s) hides 0.5 s.
    inputs = one_tensor(55 * 10**9, forward_s=0.0, responses_s=0.5, backward_s=0.0)
    p = predict(inputs, {0: "offload"}, lag=1, depth=1)
    assert p.exposed_ab_s == pytest.approx(0.5, rel=1e-12)
    # Phase C has no backward to hide the 1 s reload behind.
    assert p.exposed_c_s == pytest.approx(1.0, rel=1e-12)


def test_offload_starts_when_its_layer_ends():
    # The tensor is born at the end of the 0.25 s forward: copy runs 0.25..1.25, compute is 0.5 s.
    inputs = one_tensor(55 * 10**9, forward_s=0.25, responses_s=0.25, backward_s=0.0)
    p = predict(inputs, {0: "offload"}, lag=1, depth=1)
    assert p.exposed_ab_s == pytest.approx(0.75, rel=1e-12)


def test_hidden_offload_exposes_only_the_slowdown():
    # 0.5 s of copy under 1 s of compute: the compute overlapped by the copy runs S times slower.
    inputs = one_tensor(55 * 10**9 // 2, forward_s=0.0, responses_s=1.0, backward_s=10.0)
    p = predict(inputs, {0: "offload"}, lag=1, depth=1)
    assert p.exposed_ab_s == pytest.approx(0.5 * (1 - 1 / S), rel=1e-12)
    # The only layer's backward needs its reload first: nothing hides it.
    assert p.exposed_c_s == pytest.approx(0.5, rel=1e-12)
    keep = predict(inputs, {0: "keep"}, lag=1, depth=1)
    assert keep.exposed_ab_s == keep.exposed_c_s == 0.0


def three_layers(first_bytes, **rates):
    lts = [lt(0, first_bytes, 0), lt(1, 1, 1), lt(2, 1, 2)]
    return PlanInputs(lts, rates=Rates(d2h_gbps=1.0, h2d_gbps=1.0, copy_slowdown=S, **rates))


def test_offload_lag_throttles_the_forward():
    # Layers of 1 s each; layer 0's copy takes 2 s (1..3). With lag 1, layer 2 waits for it.
    inputs = three_layers(
        2 * 10**9, layer_forward_s=(1.0, 1.0, 1.0), responses_s=0.0, backward_s=30.0
    )
    lag1 = predict(inputs, {0: "offload"}, lag=1, depth=2)
    assert lag1.exposed_ab_s == pytest.approx(1.0, rel=1e-12)
    # With lag 2 layers 1 and 2 run under the copy: only the slowdown of 2 s is exposed.
    lag2 = predict(inputs, {0: "offload"}, lag=2, depth=2)
    assert lag2.exposed_ab_s == pytest.approx(2 * (1 - 1 / S), rel=1e-12)


def test_prefetch_depth_bounds_how_early_a_reload_starts():
    # Backward: layer 2 (1 s), layer 1 (0.1 s), layer 0 (1 s) whose 1 s reload must be done first.
    rates = dict(forward_s=0.0, responses_s=0.0, layer_backward_s=(1.0, 0.1, 1.0))
    inputs = three_layers(10**9, **rates)
    # depth 1: the reload starts when layer 2's backward ends (t=1), done at t=2; layer 1 ended
    # at 1 + 0.1 S, so layer 0 waits: C lasts 3 s against 2.1 s of backward.
    d1 = predict(inputs, {0: "offload"}, lag=1, depth=1)
    assert d1.exposed_c_s == pytest.approx(0.9, rel=1e-12)
    # depth 2: the reload overlaps layer 2's backward from t=0; only the slowdown shows.
    d2 = predict(inputs, {0: "offload"}, lag=1, depth=2)
    assert d2.exposed_c_s == pytest.approx(1 - 1 / S, rel=1e-12)


def test_recompute_costs_its_layer_forward_in_full():
    lts = [lt(0, 100, 0), lt(1, 200, 0), lt(2, 100, 1), lt(3, 200, 1)]
    rates = Rates(layer_forward_s=(0.25, 0.5), layer_backward_s=(1.0, 1.0), responses_s=1.0)
    inputs = PlanInputs(lts, rates=rates)
    p = predict(inputs, {1: "recompute", 3: "recompute"}, lag=1, depth=1)
    assert p.exposed_ab_s == 0.0
    assert p.exposed_c_s == pytest.approx(0.75, rel=1e-12)


def test_peaks_by_hand():
    # Stage 0: hot 1, kept 10, offloaded 20. Stage 1: hot 2, checkpoint 30 offloaded, 40
    # recomputed. Stage 2: kept 50.
    hot, kept, off, rec = [1, 2, 0], [10, 0, 50], [20, 30, 0], [0, 40, 0]
    kw = dict(hot_extra=100, working=(1000, 2000, 3000))
    a, b, c = peaks(hot, kept, off, rec, lag=1, depth=1, **kw)
    # A: end of stage 2 holds 63 resident + offloads of stages 1..2 in flight (30).
    assert a == 63 + 30 + 1000
    # B: 63 resident + 100 gradient cache + stage 2's offload (0) in flight.
    assert b == 163 + 2000
    # C: stage 1's backward holds its reload (30), its recompute (40), the window (stage 0: 20).
    assert c == 163 + 90 + 3000
    a2, b2, c2 = peaks(hot, kept, off, rec, lag=2, depth=2, **kw)
    assert (a2, b2, c2) == (63 + 50 + 1000, 163 + 30 + 2000, 163 + 90 + 3000)


def test_peaks_agree_with_predict():
    lts = [lt(0, 1, 0, hot=True), lt(1, 10, 0), lt(2, 20, 0)]
    lts += [lt(3, 2, 1, hot=True), lt(4, 30, 1), lt(5, 40, 1), lt(6, 50, 2)]
    inputs = PlanInputs(
        lts, hot_extra_bytes=100, a_working_bytes=1000, b_working_bytes=2000, c_working_bytes=3000
    )
    p = predict(inputs, {2: "offload", 4: "offload", 5: "recompute"}, lag=1, depth=1)
    assert (p.peak_a_bytes, p.peak_b_bytes, p.peak_c_bytes) == (1093, 2163, 3253)


def test_stage_times_split_by_bytes_and_layers():
    lts = [lt(0, 10, None), lt(1, 30, 0), lt(2, 60, 1), lt(3, 100, None)]
    stages, responses = build_stages(lts, Rates(forward_s=2.0))
    assert [s.layer for s in stages] == [None, 0, 1, None]
    assert [s.forward_s for s in stages] == pytest.approx([0.1, 0.3, 0.6, 1.0])
    assert [s.backward_s for s in stages] == pytest.approx([0.2, 0.6, 1.2, 2.0])
    assert responses == pytest.approx(6.0)
    stages, _ = build_stages(lts, Rates(forward_s=2.0, layer_forward_s=(0.5, 0.5)))
    # The layers take their own times; the stages outside share the rest by bytes.
    assert [s.forward_s for s in stages] == pytest.approx([1 / 11, 0.5, 0.5, 10 / 11])
    stages, _ = build_stages(lts, Rates(saved_bytes_per_s=100.0))
    assert sum(s.forward_s for s in stages) == pytest.approx(2.0)


@given(
    st.lists(st.floats(0, 3), min_size=1, max_size=6),
    st.lists(st.floats(0, 3), min_size=1, max_size=6),
    st.integers(0, 3),
    st.floats(1.0, 1.5),
    st.data(),
)
def test_simulation_never_finishes_earlier_with_longer_copies(work, copies, lag, slow, data):
    """Backs make_plan's monotonicity: more offloaded bytes never shorten the timeline."""
    n = min(len(work), len(copies))
    work, copies = work[:n], copies[:n]
    waits = [k - 1 - lag if k - 1 - lag >= 0 else None for k in range(n)]
    longer = [c + data.draw(st.floats(0, 2)) for c in copies]
    w1, c1 = simulate(work, copies, waits, list(range(n)), slow)
    w2, c2 = simulate(work, longer, waits, list(range(n)), slow)
    assert all(b >= a - 1e-9 for a, b in zip(w1 + c1, w2 + c2, strict=True))
    assert w1[-1] >= sum(work) - 1e-9  # compute never runs faster than full speed


def test_simulate_detects_a_cycle():
    with pytest.raises(AssertionError, match="deadlock"):
        simulate([1.0], [1.0], [0], [0], 1.0)
