"""The reference MoE decoder, the router-loss formulas against their definitions and against
transformers' own ``load_balancing_loss_func``, and the Hugging Face MoE adapters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hbmplan.models import MoEConfig, RouterSpec, adapt
from hbmplan.schedules import dense_step
from hbmplan.schedules.router import RoutingSums, balance_weights, routing_sums
from tests.helpers import VOCAB, grads_of, pg_loss, random_group, tiny_hf
from tests.helpers.moe import (
    HF_MOE,
    aux_by_definition,
    grad_diff,
    hf_load_balancing_loss_func,
    tiny_hf_moe,
    tiny_moe,
)


def _sums_of(spec, logits):
    return routing_sums(spec, [lg[None] for lg in logits], [logits[0].shape[0]])


def _aux(spec, sums: RoutingSums) -> torch.Tensor:
    n = torch.tensor(sums.tokens, dtype=sums.prob_sums.dtype)
    return (balance_weights(spec, sums.counts.to(n.dtype), n) * sums.prob_sums).sum()


# ---- the reference decoder ------------------------------------------------------------------


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_block_equals_the_dense_mixture(norm_topk_prob):
    """Routed experts give sum_j w_j * expert_{e_j}(x): compared with every expert computed on
    every token and weighted by the (sparse) gate."""
    model = tiny_moe(experts=5, top_k=3, norm_topk_prob=norm_topk_prob)
    block = model.layers[0].moe
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    out, logits = block(x)
    every = torch.stack(
        [
            F.linear(F.silu(F.linear(x, block.w_gate[e])) * F.linear(x, block.w_up[e]),
                     block.w_down[e])
            for e in range(5)
        ],
        dim=-2,
    )  # fmt: skip

    def mixture(normalise):
        w, idx = logits.softmax(-1).topk(3, -1)
        if normalise:
            w = w / w.sum(-1, keepdim=True)
        gate = torch.zeros_like(logits).scatter(-1, idx, w)  # [B, T, E], k nonzero
        return (gate[..., None] * every).sum(-2)

    torch.testing.assert_close(out, mixture(norm_topk_prob), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(out, mixture(not norm_topk_prob), rtol=1e-6, atol=0)


def test_prefix_forward_equals_full_forward_and_counts_dispatches():
    model = tiny_moe(experts=4, top_k=2, layers=3)
    ids = torch.randint(0, VOCAB, (1, 12))
    pos = torch.arange(12)[None]
    before = model.dispatched
    hidden, _, logits = model(ids, pos)
    assert model.dispatched - before == 12 * 2 * 3  # k pairs per token per layer
    _, kv, _ = model(ids[:, :8], pos[:, :8])
    h2, _, lg2 = model(ids[:, 8:], pos[:, 8:], prefix_kv=kv)
    torch.testing.assert_close(h2, hidden[:, 8:], rtol=1e-12, atol=1e-13)
    for a, b in zip(lg2, logits, strict=True):
        torch.testing.assert_close(a, b[:, 8:], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(top_k=7), r"top_k must lie in \[1, num_experts=6\], got 7"),
     (dict(top_k=0), "got 0"),
     (dict(router_aux_loss_coef=-1.0), "aux_coef must be finite and >= 0, got -1.0"),
     (dict(router_z_loss_coef=float("nan")), "z_coef must be finite"),
     (dict(load_balancing="per-token"), "load_balancing must be 'per-layer' or 'all-layers'"),
     (dict(num_experts=0), "num_experts must be >= 1, got 0"),
     (dict(num_kv_heads=4), "multiple of num_kv_heads, got 6 and 4")],
)  # fmt: skip
def test_config_rejects_bad_values(kwargs, match):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=6, num_kv_heads=2,
                head_dim=8, num_experts=6, top_k=2)  # fmt: skip
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{**base, **kwargs})


# ---- the router-loss formulas ----------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_per_layer_formula_is_switch_by_definition(top_k):
    spec = RouterSpec(num_experts=5, top_k=top_k, aux_coef=1.0)
    g = torch.Generator().manual_seed(top_k)
    logits = [torch.randn(9, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    got = _aux(spec, _sums_of(spec, logits))
    torch.testing.assert_close(got, aux_by_definition(logits, spec), rtol=1e-13, atol=0)


@pytest.mark.parametrize("top_k", [1, 3])
def test_all_layers_formula_is_transformers_load_balancing_loss(top_k):
    spec = RouterSpec(num_experts=6, top_k=top_k, aux_coef=1.0, load_balancing="all-layers",
                      softmax_dtype="logits")  # fmt: skip
    g = torch.Generator().manual_seed(top_k)
    logits = [torch.randn(11, 6, generator=g, dtype=torch.float64) for _ in range(4)]
    got = _aux(spec, _sums_of(spec, logits))
    want = hf_load_balancing_loss_func()(tuple(logits), 6, top_k, None)
    # transformers sums the probabilities in float32
    torch.testing.assert_close(got, want.double(), rtol=2e-7, atol=0)
    assert not torch.isclose(got, aux_by_definition(logits, spec), rtol=1e-3)


def test_padding_counts_nowhere_and_z_sums():
    spec = RouterSpec(num_experts=4, top_k=2, aux_coef=1.0, z_coef=1.0)
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64)  # [L, B, T, E]
    lengths = [6, 2]
    sums = routing_sums(spec, list(lg), lengths)
    for b, n in enumerate(lengths):
        alone = routing_sums(spec, [t[b : b + 1, :n] for t in lg], [n])
        assert torch.equal(sums.counts[b], alone.counts[0])
        torch.testing.assert_close(sums.prob_sums[b], alone.prob_sums[0], rtol=1e-15, atol=0)
        z = (lg[:, b, :n].logsumexp(-1) ** 2).sum(-1)
        torch.testing.assert_close(sums.z_sums[b], z, rtol=1e-14, atol=0)
    assert sums.counts.sum().item() == 2 * 2 * sum(lengths)  # L * k * valid tokens


# ---- Hugging Face MoE adapters ---------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(HF_MOE))
def test_hf_router_spec_from_the_config(family):
    model = tiny_hf_moe(family, coef=0.25)
    spec = adapt(model).router
    assert spec == RouterSpec(
        num_experts=model.num_experts, top_k=2, aux_coef=0.25, load_balancing="all-layers",
        softmax_dtype="logits",
    )  # fmt: skip
    assert adapt(tiny_hf_moe(family, on=False)).router is None
    assert adapt(tiny_hf_moe(family, coef=0.0)).router is None
    assert adapt(tiny_hf("Qwen3")).router is None


@pytest.mark.parametrize("family", sorted(HF_MOE))
def test_dense_router_loss_is_the_models_own(family):
    """dense_step with tokens packed two per microbatch equals a plain Hugging Face loop: one
    forward per trajectory, ``loss + router_aux_loss_coef * out.aux_loss``, backward."""
    model = tiny_hf_moe(family, coef=0.7)
    group = random_group(9, [1, 6, 3], seed=4)

    def native():
        aux = 0.0
        for i, r in enumerate(group.responses):
            out = model(input_ids=torch.cat([group.prompt, r[:-1]])[None])
            lp = out.logits[0, group.prompt_len - 1 :].log_softmax(-1)
            lp = lp.gather(-1, r[:, None]).squeeze(-1)
            (pg_loss(lp, group, i) + model.router_aux_loss_coef * out.aux_loss).backward()
            aux += out.aux_loss.item()
        box["aux"] = aux

    box: dict = {}
    native_grads = grads_of(model, native)
    dense_grads = grads_of(
        model, lambda: box.setdefault("stats", dense_step(model, [group], pg_loss, 30))
    )
    r = box["stats"].router
    assert abs(r.aux_loss.item() - box["aux"]) <= 1e-6 * box["aux"]
    assert abs(r.loss.item() - 0.7 * box["aux"]) <= 1e-6 * box["aux"]
    assert grad_diff(dense_grads, native_grads) <= 1e-6
