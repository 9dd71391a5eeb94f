"""Analytic FLOP accounting against torch's FlopCounterMode on the reference decoder."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hbmplan.capacity import ModelSpec, model_spec
from hbmplan.capacity.flops import dense_flops, flop_ideal_speedup, reuse_flops
from hbmplan.models import DecoderConfig, ReferenceDecoder
from hbmplan.schedules import dense_step, reuse_step
from tests.helpers import pg_loss, random_group

aten = torch.ops.aten


def _causal_keys(q_len: int, k_len: int) -> int:
    """Keys seen by q_len queries aligned bottom-right against k_len keys."""
    return q_len * (k_len - q_len) + q_len * (q_len + 1) // 2


def _sdpa_fwd(query, key, *args, **kwargs):
    B, H, T, D = query
    return 4 * B * H * D * _causal_keys(T, key[2])


def _sdpa_bwd(grad_out, query, key, *args, **kwargs):
    return 2 * _sdpa_fwd(query, key)


# CPU SDPA is not in FlopCounterMode's registry; count each call at the convention's rate
# (causal keys only, backward = 2x forward) from the shapes it was actually called with.
ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_fwd,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_bwd,
}


def _measured(fn, model, groups) -> int:
    with FlopCounterMode(display=False, custom_mapping=ATTENTION) as counter:
        fn(model, groups, pg_loss)
    return counter.get_total_flops()


def _model(layers: int) -> ReferenceDecoder:
    cfg = DecoderConfig(vocab_size=97, hidden_size=64, num_layers=layers, num_heads=4,
                        num_kv_heads=2, intermediate_size=96, max_positions=1024)  # fmt: skip
    return ReferenceDecoder(cfg)


@pytest.mark.parametrize("P, S, G", [(48, 8, 4), (160, 16, 3)])
def test_measured_flops_match_analytic_counts(P, S, G):
    model = _model(layers=2)
    groups = [random_group(P, [S] * G, seed=P, dtype=torch.float32)]
    shape = model_spec(model)
    dense, reuse = _measured(dense_step, model, groups), _measured(reuse_step, model, groups)
    assert dense == pytest.approx(dense_flops(shape, P, [S] * G), rel=0.01)
    assert reuse == pytest.approx(reuse_flops(shape, P, [S] * G, executed=True), rel=0.01)
    # never more work than the convention assumes
    assert reuse <= reuse_flops(shape, P, [S] * G)


@pytest.mark.parametrize("P, S, G", [(64, 8, 4)])
def test_measured_speedup_matches_flop_ideal(P, S, G):
    """On a deeper model the dead prompt tail of the last layer (see reuse_flops) is < 5%."""
    model = _model(layers=8)
    groups = [random_group(P, [S] * G, seed=P, dtype=torch.float32)]
    ratio = _measured(dense_step, model, groups) / _measured(reuse_step, model, groups)
    ideal = flop_ideal_speedup(model_spec(model), P, [S] * G)
    assert ideal <= ratio <= 1.05 * ideal


def test_design_table_flop_ideal():
    """docs/design.md's FLOP-ideal column for four Llama3-8B-shaped layers."""
    shape = ModelSpec(name="llama3-8b, 4 layers", vocab_size=32000, hidden_size=4096,
                      num_layers=4, num_heads=32, num_kv_heads=8, head_dim=128,
                      intermediate_size=14336)  # fmt: skip
    table = {(2048, 512, 4): 2.37, (2048, 512, 8): 3.07, (8192, 512, 8): 5.28,
             (8192, 1024, 16): 5.21, (16384, 1024, 16): 7.34}  # fmt: skip
    for (P, S, G), ideal in table.items():
        assert round(flop_ideal_speedup(shape, P, [S] * G), 2) == ideal


def test_shape_from_hf_config():
    """Also: the 0.1 name ModelShape still builds the one shape type, with a warning."""
    import transformers

    with pytest.warns(DeprecationWarning, match="ModelShape moved"):
        from hbmplan.capacity.flops import ModelShape

    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=80, vocab_size=50)  # fmt: skip
    assert ModelShape.of(cfg) == ModelShape(64, 3, 4, 2, 16, 80, 50)
