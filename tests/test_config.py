"""One ReuseConfig, validated once, taken by memory() (from its keywords) and reuse_step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hbmplan
from hbmplan import ReuseConfig
from hbmplan.runtime.offload import reload_order
from hbmplan.schedules import reuse_step
from tests.helpers import grads_of, pg_loss, random_group, tiny_reference


@pytest.mark.parametrize(
    "kw, exc, match",
    [(dict(attention="flash"), ValueError, "attention must be one of"),
     (dict(offload="some"), ValueError, "offload must be 'auto', 'off' or 'all', got 'some'"),
     (dict(tokens_per_microbatch=0), ValueError, "tokens_per_microbatch must be >= 1, got 0"),
     (dict(tokens_per_microbatch=2.0), TypeError, "tokens_per_microbatch must be an int"),
     (dict(grad_cache_dtype=torch.int32), TypeError, "grad_cache_dtype must be a floating"),
     (dict(router_loss="sometimes"), ValueError, "router_loss must be 'per-trajectory'"),
     (dict(hbm_budget="lots"), ValueError, "a byte size must look like '80GiB'"),
     (dict(hbm_budget=-1), ValueError, "a byte size must be positive"),
     (dict(rates=1.0), TypeError, "rates must be an hbmplan Rates, got float"),
     (dict(deterministic=1), TypeError, "deterministic must be a bool, got int"),
     (dict(check_finite="yes"), TypeError, "check_finite must be a bool, got str"),
     (dict(atomic=None), TypeError, "atomic must be a bool, got NoneType"),
     (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0, got 0.0"),
     (dict(temperature="hot"), ValueError, "temperature must be a finite number > 0"),
     (dict(entropy=1), TypeError, "entropy must be a bool, got int")],
)  # fmt: skip
def test_every_field_is_checked(kw, exc, match):
    with pytest.raises(exc, match=match):
        ReuseConfig(**kw)
    with pytest.raises(exc, match=match):
        hbmplan.memory(tiny_reference(), **kw)


def test_config_is_frozen_and_normalised():
    cfg = ReuseConfig(hbm_budget="1 KiB", offload="all")
    assert cfg.hbm_budget == 1024 and cfg.offloads and not ReuseConfig().offloads
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.offload = "off"
    assert cfg.replace(offload="off").offload == "off" and cfg.offload == "all"
    with pytest.raises(ValueError, match="offload must be"):
        cfg.replace(offload="never")
    fields = {f.name: f for f in dataclasses.fields(ReuseConfig)}
    assert set(fields) == {
        "tokens_per_microbatch", "grad_cache_dtype", "check_finite", "router_loss", "attention",
        "deterministic", "hbm_budget", "offload", "rates", "atomic",
        "grad_sync",  # data parallel
        "skip_inert", "check_skips", "token_filter",  # token filtering
        "cp_mesh", "cp_exchange", "cp_balance",
        "temperature", "entropy",  # TRL
    }  # fmt: skip


def test_grad_sync_is_validated():
    assert ReuseConfig().grad_sync == "phase-c"
    with pytest.raises(ValueError, match="grad_sync must be"):
        ReuseConfig(grad_sync="always")


def test_memory_builds_one_config_from_its_keywords():
    with hbmplan.memory(tiny_reference(), "2MiB", "all", tokens_per_microbatch=8) as mem:
        assert mem.config == ReuseConfig(hbm_budget=2**21, offload="all", tokens_per_microbatch=8)


def test_reuse_step_takes_a_config_or_keywords_not_both():
    model = tiny_reference()
    groups = [random_group(9, [3, 2, 4], seed=1)]
    by_keywords = grads_of(model, lambda: reuse_step(model, groups, pg_loss, 4, check_finite=True))
    cfg = ReuseConfig(tokens_per_microbatch=4, check_finite=True)
    by_config = grads_of(model, lambda: reuse_step(model, groups, pg_loss, config=cfg))
    assert all(torch.equal(by_keywords[k], by_config[k]) for k in by_keywords)
    with pytest.raises(TypeError, match=r"not both: got \['check_finite'\]"):
        reuse_step(model, groups, pg_loss, config=ReuseConfig(), check_finite=True)
    with pytest.raises(TypeError, match="config must be an hbmplan ReuseConfig"):
        reuse_step(model, groups, pg_loss, config={"check_finite": True})


def test_reuse_step_offloads_for_one_call_when_its_config_asks():
    model = tiny_reference(torch.float32, layers=3)
    groups = [random_group(30, [5, 3], seed=2, dtype=torch.float32)]
    plain = grads_of(model, lambda: reuse_step(model, groups, pg_loss))
    box = {}

    def offloaded():
        box["stats"] = reuse_step(model, groups, pg_loss, config=ReuseConfig(offload="all"))

    moved = grads_of(model, offloaded)
    assert all(torch.equal(plain[k], moved[k]) for k in plain)
    assert box["stats"].offload.engine.bytes_offloaded > 0


def test_reload_order_is_last_layer_first():
    handles = [(0, "a0"), (2, "c0"), (None, "n"), (1, "b0"), (2, "c1")]
    order, depth = reload_order(handles, prefetch_depth=2)
    assert order == ["c0", "c1", "b0", "a0", "n"]
    assert depth == 2 * 2  # two layers of the layer with the most storages
    assert reload_order([(0, "a")], 0) == (["a"], 1)
