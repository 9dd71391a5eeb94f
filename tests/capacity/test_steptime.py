"""The frontier's step-time estimate: FLOPs at the card's measured rate, the planner's timeline
for host copies and recompute, the plans each schedule times, and where no time is given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hbmplan.capacity.flops import (
    attention_flops,
    dense_flops,
    linear_flops_per_token,
    reuse_flops,
)
from hbmplan.capacity.frontier import Shards, frontier
from hbmplan.capacity.presets import PRESETS
from hbmplan.capacity.step_bytes import estimate_step, prompt_layer_bytes
from hbmplan.capacity.steptime import H200, step_time

ROOT = Path(__file__).resolve().parents[2]
REUSE = ("reuse", "reuse+recompute", "reuse+offload", "reuse+offload+recompute")
LLAMA = PRESETS["llama3-8b"]


def test_h200_rates_are_the_recorded_measurements():
    ceilings = json.loads((ROOT / "benchmarks/results/h200_ceilings_2026-11.json").read_text())
    assert ceilings["device"] == "NVIDIA H200"
    assert H200.d2h_gbps == ceilings["d2h_pinned_GBps"]
    assert H200.h2d_gbps == ceilings["h2d_pinned_GBps"]
    assert H200.copy_slowdown == ceilings["gemm_slowdown_under_d2h"]
    assert H200.flops_range == (505e12, 529e12)  # the dense trainer, h200_ceilings_2026-11.md
    assert H200.flops == sum(H200.flops_range) / 2 < ceilings["bf16_gemm_TFLOPs"] * 1e12


@pytest.mark.parametrize("tp", [1, 4])
def test_compute_is_the_flop_count_at_the_card_rate(tp):
    shape, lens, rate = LLAMA, [1024] * 8, H200.flops * tp
    dense = step_time(LLAMA, 8192, lens, "dense", tp=tp)
    assert dense.seconds == dense.compute_s == dense_flops(shape, 8192, lens) / rate
    reuse = step_time(LLAMA, 8192, lens, "reuse", tp=tp)
    assert reuse.seconds == reuse_flops(shape, 8192, lens, executed=True) / rate
    assert reuse.exposed_s == 0.0 and reuse.recomputed_layers == 0
    ckpt = step_time(LLAMA, 8192, lens, "dense+ckpt", tp=tp)
    layers_fwd = sum(32 * (linear_flops_per_token(shape) * t + attention_flops(shape, t, 0))
                     for t in (8192 + s - 1 for s in lens))  # fmt: skip
    assert ckpt.compute_s == dense.compute_s and ckpt.exposed_s == layers_fwd / rate


def test_moe_counts_the_active_experts():
    spec = PRESETS["qwen3-30b-a3b"]
    assert spec.active_intermediate_size == 8 * 768  # 8 of 128 experts per token


def test_recompute_is_exposed_in_full_and_copies_only_where_compute_does_not_hide_them():
    lens, P = [1024] * 16, 16384
    layer_bytes = prompt_layer_bytes(LLAMA, P)
    reuse = step_time(LLAMA, P, lens, "reuse")
    recompute = step_time(LLAMA, P, lens, "reuse+recompute", layer_bytes=layer_bytes)
    shape = LLAMA
    layer_fwd = (
        linear_flops_per_token(shape) * (P - 1) + attention_flops(shape, P - 1, 0)
    ) / H200.flops
    assert recompute.recomputed_layers == 32
    assert recompute.exposed_s == pytest.approx(32 * layer_fwd, rel=1e-9)
    tiny = step_time(LLAMA, P, lens, "reuse+offload", layer_bytes=(1024, 64))
    assert 0 < tiny.exposed_s < 1e-6  # 1 KiB per layer: hidden, bar the copy slowdown
    big = step_time(LLAMA, P, lens, "reuse+offload", layer_bytes=layer_bytes)
    assert big.exposed_s > 0.1 and big.seconds == reuse.seconds + big.exposed_s


def test_offload_with_recompute_takes_the_least_exposed_plan():
    # at 74k prompt tokens a layer's recompute (attention-heavy) costs more than its copies
    lens, P = [1024] * 16, 74086
    kw = dict(layer_bytes=prompt_layer_bytes(LLAMA, P))
    plans = [(32 - r, r, True) for r in range(33)]
    best = step_time(LLAMA, P, lens, "reuse+offload+recompute", plans=plans, **kw)
    each = [step_time(LLAMA, P, lens, "reuse+offload+recompute", plans=[p], **kw) for p in plans]
    assert best.exposed_s == min(t.exposed_s for t in each)
    assert 0 < best.recomputed_layers < 32  # neither extreme: copies and recompute share
    with pytest.raises(ValueError, match="at most 32 layers"):
        step_time(LLAMA, P, lens, "reuse+offload", plans=[(20, 20, True)], **kw)


def _times(result):
    return {k: (v.time.seconds if v.time else None) for k, v in result.schedules.items()}


def test_below_plain_reuse_capacity_every_reuse_schedule_takes_its_time():
    # the planner keeps everything when everything fits: nothing moved, nothing recomputed
    r = frontier("llama3-8b", "80GiB", 16, 1024, shards=Shards(fsdp=8), prompt_len=4096)
    assert r.prompt_len == 4096 and r.card is H200
    times = _times(r)
    assert len({times[k] for k in REUSE}) == 1 and times["reuse"] is not None
    assert times["dense"] > times["reuse"] and times["dense+ckpt"] > times["dense"]


@pytest.mark.parametrize("P", [16384, 32768, 50000, 70000, 90000])
def test_the_planner_with_both_options_is_never_slower(P):
    r = frontier("llama3-8b", "80GiB", 16, 1024, shards=Shards(fsdp=8), prompt_len=P)
    times = _times(r)
    both = times["reuse+offload+recompute"]
    assert both is not None  # it fits the longest prompts of the reuse schedules
    for k in ("reuse+offload", "reuse+recompute"):
        assert times[k] is None or both <= times[k] * (1 + 1e-12), k
    for name, f in r.schedules.items():
        assert (f.time is not None) == (f.max_prompt_len >= P), name


def test_recompute_takes_the_fewest_layers_that_fit():
    r = frontier("llama3-8b", "80GiB", 16, 1024, shards=Shards(fsdp=8), prompt_len=32768)
    n = r["reuse+recompute"].time.recomputed_layers
    assert 0 < n < 32
    usable, static = r.usable_bytes, r.static.total

    def fits(layers):
        est = estimate_step(LLAMA, 32768, [1024] * 16, "reuse+recompute",
                            tokens_per_microbatch=1024, recompute_layers=layers)  # fmt: skip
        return static + max(v.total for v in est.values()) <= usable

    assert fits(n) and not fits(n - 1)


def test_default_prompt_is_the_longest_every_fitting_schedule_trains():
    r = frontier("llama3-8b", "80GiB", 16, 1024, shards=Shards(fsdp=8))
    assert r.prompt_len == min(f.max_prompt_len for f in r.schedules.values())
    assert all(f.time is not None for f in r.schedules.values())
    nothing = frontier("llama3-8b", "80GiB", 16, 1024)  # static memory alone exceeds 80 GiB
    assert nothing.prompt_len == 0 and all(f.time is None for f in nothing.schedules.values())
    assert "not estimated (no schedule fits)" in nothing.table()


@pytest.mark.parametrize(
    "kwargs", [dict(dtype="float32"), dict(target="cpu"), dict(card=None)], ids=str
)
def test_no_time_without_a_measured_rate(kwargs):
    r = frontier("qwen3-8b", "141GiB", 8, 512, shards=Shards(fsdp=8), **kwargs)
    assert r.card is None and all(f.time is None for f in r.schedules.values())
    assert any(f.max_prompt_len for f in r.schedules.values())
    assert "step time: not estimated" in r.table()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(shards=Shards(tp=3)), ValueError, r"shards.tp must divide the model's 32 query "
         r"heads and 8 key/value heads \(one of \[1, 2, 4, 8\]\), got 3"),
        (dict(shards=Shards(tp=16)), ValueError, "got 16"),
        (dict(prompt_len=1), ValueError, "prompt_len must be an int >= 2, got 1"),
        (dict(card="a100"), ValueError, r"card must be one of \['h200'\], got 'a100'"),
        (dict(card=3), TypeError, "card must be a name, a Card or None, got int"),
    ],
)  # fmt: skip
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        frontier("llama3-8b", "80GiB", 4, 128, **kwargs)


@pytest.mark.parametrize("schedule, knob", [("reuse+recompute", "recompute_layers"),
                                            ("reuse+offload", "offload_layers")])  # fmt: skip
def test_partial_plans_lie_between_reuse_and_the_lowest_plan(schedule, knob):
    def peak(**kw):
        est = estimate_step(LLAMA, 20000, [512] * 4, schedule, **kw)
        return max(v.total for v in est.values())

    plain = max(v.total for v in estimate_step(LLAMA, 20000, [512] * 4, "reuse").values())
    assert peak(**{knob: 0}) == plain and peak(**{knob: 32}) == peak()
    peaks = [peak(**{knob: n}) for n in range(2, 33)]
    assert peaks == sorted(peaks, reverse=True) and peaks[-1] < plain
    with pytest.raises(ValueError, match=f"{knob} must lie in"):
        peak(**{knob: 33})
