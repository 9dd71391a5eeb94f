"""frontier() takes its options as keywords or as one FrontierConfig, checked on construction."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hbmplan
from hbmplan import FrontierConfig, Shards
from hbmplan.capacity import CARDS


def test_a_config_gives_the_same_frontier_as_the_keywords():
    kw = dict(dtype="bf16", shards=Shards(fsdp=8), rows_per_microbatch=2, prompt_len=4096)
    by_keywords = hbmplan.frontier("llama3-8b", "80GiB", 16, 1024, **kw)
    by_config = hbmplan.frontier("llama3-8b", "80GiB", 16, 1024, config=FrontierConfig(**kw))
    assert by_config == by_keywords
    assert by_config.table() == by_keywords.table()


def test_config_normalises_and_is_frozen():
    cfg = FrontierConfig(dtype="bf16", schedules=["reuse", "dense"], card="h200")
    assert cfg.dtype == torch.bfloat16 and cfg.schedules == ("reuse", "dense")
    assert cfg.card is CARDS["h200"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.target = "cpu"
    assert cfg.calibration() is None
    assert FrontierConfig(calibrate=1.5).calibration().scale == 1.5


@pytest.mark.parametrize(
    "kw, exc, match",
    [(dict(schedules="reuse"), ValueError, "schedules must be a non-empty list"),
     (dict(schedules=["fast"]), ValueError, "schedules must be a non-empty list"),
     (dict(dtype="int8"), ValueError, "dtype must be one of"),
     (dict(optimizer="lion"), ValueError, "optimizer must be one of"),
     (dict(shards=(8, 1)), TypeError, "shards must be an hbmplan Shards, got tuple"),
     (dict(calibrate=0), ValueError, "calibrate must be a model, a Calibration or a scale > 0"),
     (dict(fragmentation=1.0), ValueError, r"fragmentation must lie in \[0, 1\), got 1.0"),
     (dict(rows_per_microbatch=0), ValueError, "rows_per_microbatch must be an int >= 1"),
     (dict(target="tpu"), ValueError, "target must be 'cpu' or 'cuda', got 'tpu'"),
     (dict(max_prompt_len=1), ValueError, "max_prompt_len must be an int >= 2"),
     (dict(prompt_len=1), ValueError, "prompt_len must be an int >= 2"),
     (dict(card="a100x"), ValueError, "card must be one of"),
     (dict(card=80), TypeError, "card must be a name, a Card or None, got int"),
     (dict(fused_gqa=1), TypeError, "fused_gqa must be a bool, got int")],
)  # fmt: skip
def test_every_option_is_checked_in_config_and_in_frontier(kw, exc, match):
    with pytest.raises(exc, match=match):
        FrontierConfig(**kw)
    with pytest.raises(exc, match=match):
        hbmplan.frontier("llama3-8b", "80GiB", 16, 1024, **kw)


def test_config_and_keywords_together_are_refused():
    with pytest.raises(TypeError, match=r"not both: got \['rows_per_microbatch'\]"):
        hbmplan.frontier(
            "llama3-8b", "80GiB", 4, 256, rows_per_microbatch=2, config=FrontierConfig()
        )
    with pytest.raises(TypeError, match="config must be an hbmplan FrontierConfig"):
        hbmplan.frontier("llama3-8b", "80GiB", 4, 256, config={"target": "cpu"})


def test_context_parallel_divides_the_prompt_per_rank():
    from hbmplan.capacity.step_bytes import estimate_step

    spec = hbmplan.frontier("llama3-8b", "80GiB", 8, 512, schedules=("reuse",)).model
    one, two = (
        estimate_step(spec, 8193, [512] * 8, "reuse", target="cuda", cp=cp)["C"] for cp in (1, 2)
    )
    assert two.prompt_kv * 2 == one.prompt_kv and two.grad_cache * 2 == one.grad_cache
    assert two.prompt_activations < 0.51 * one.prompt_activations
    result = hbmplan.frontier("llama3-8b", "80GiB", 8, 512, shards=hbmplan.Shards(tp=2, cp=2))
    assert set(result.schedules) == {"dense", "reuse"}  # CP runs without offload or recompute
    base = hbmplan.frontier("llama3-8b", "80GiB", 8, 512, shards=hbmplan.Shards(tp=2))
    assert result.schedules["reuse"].max_prompt_len > base.schedules["reuse"].max_prompt_len
    with pytest.raises(ValueError, match="cp > 1 is modelled for the 'reuse' and 'dense'"):
        estimate_step(spec, 100, [5], "reuse+offload", cp=2)
