"""Frozen parameters in every pattern (PEFT LoRA on any targets, frozen embeddings, frozen lower
layers, all frozen but the LM head): the reuse schedule gives the dense trainer's gradients, a
K or V without a graph gets no gradient buffer, and phase A without any trainable parameter
before the head keeps no graph (phase C has nothing to do)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model, inject_adapter_in_model

import hbmplan
from hbmplan.kernels import launch
from hbmplan.models.adapter import adapt
from hbmplan.schedules import dense_step
from tests.helpers import (
    assert_tolerance_rule,
    grads_of,
    max_rel_diff,
    pg_loss,
    random_group,
    tiny_hf,
    tiny_reference,
)
from tests.models.test_moe import grad_diff, tiny_moe

interpreted = pytest.mark.skipif(
    not launch.detect().interpret, reason="runs the Triton kernel in its CPU interpreter"
)

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PATTERNS = {  # pattern -> K/V tensors of a 2-layer model that carry a gradient
    "lora_qv": 3,  # PEFT's Llama default: layer 0's K comes only from frozen weights
    "lora_all": 4,
    "embeddings": 4,
    "lower": 2,  # embeddings and layer 0 frozen
    "head_only": 0,
}


def frozen(model, pattern: str):
    """``model`` with ``pattern`` applied: a real PEFT LoRA (a ``PeftModel`` for Hugging Face
    models, adapters injected in place for hbmplan's decoders; B initialised randomly so that
    every LoRA gradient is nonzero), or plain ``requires_grad_(False)`` on parts of it."""
    if pattern.startswith("lora"):
        targets = ["q_proj", "v_proj"] if pattern == "lora_qv" else LINEAR
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        if hasattr(model, "config"):
            return get_peft_model(model, cfg)
        return inject_adapter_in_model(cfg, model)
    adapter = adapt(model)
    embed = model.get_input_embeddings() if hasattr(model, "config") else model.embed
    if pattern == "embeddings":
        embed.requires_grad_(False)
    elif pattern == "lower":
        embed.requires_grad_(False)
        adapter.layers[0].requires_grad_(False)
    elif pattern == "head_only":
        model.requires_grad_(False)
        adapter.lm_head.requires_grad_(True)
    elif pattern == "experts_last":  # MoE: only the head and the last layer's experts train
        model.requires_grad_(False)
        adapter.lm_head.requires_grad_(True)
        block = adapter.layers[-1].moe
        for w in (block.w_gate, block.w_up, block.w_down):
            w.requires_grad_(True)
    else:
        raise AssertionError(pattern)
    return model


def reuse(model, groups, **kw):
    box = {}

    def run():
        with hbmplan.memory(model, **kw) as mem:
            box["stats"] = [mem.step(g, pg_loss) for g in groups]

    return grads_of(model, run), box["stats"]


def kv_bytes_per_tensor(model, prompt_len, itemsize=8):
    cfg = adapt(model).config if hasattr(model, "config") else model.cfg
    if hasattr(cfg, "num_key_value_heads"):
        kv_heads, dim = cfg.num_key_value_heads, adapt(model).head_dim
    else:
        kv_heads, dim = cfg.num_kv_heads, cfg.dim
    return kv_heads * (prompt_len - 1) * dim * itemsize


@pytest.mark.parametrize("attention", ["padded", "reference"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("kind", ["reference", "Llama", "Qwen3"])
def test_frozen_patterns_equal_dense_fp64(kind, pattern, attention):
    base = tiny_reference() if kind == "reference" else tiny_hf(kind)
    model = frozen(base, pattern)
    groups = [random_group(15, [1, 4, 7], seed=2), random_group(11, [3, 5], seed=3)]
    dense = grads_of(model, lambda: dense_step(model, groups, pg_loss))
    got, [stats] = reuse(model, [groups], tokens_per_microbatch=16, attention=attention)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert dense.keys() == trainable
    assert max_rel_diff(got, dense) <= (1e-12 if kind == "reference" else 1e-6)
    # no gK/gV buffer for a K or V without a graph (the largest group's cache is reported)
    assert stats.grad_cache_bytes == PATTERNS[pattern] * kv_bytes_per_tensor(model, 15)


@given(
    frozen_mask=st.lists(st.booleans(), min_size=21, max_size=21),  # one per parameter
    prompt_len=st.integers(2, 20),
    response_lens=st.lists(st.integers(1, 8), min_size=1, max_size=4),
    attention=st.sampled_from(["padded", "reference"]),
    tokens_per_microbatch=st.sampled_from([None, 12]),
    seed=st.integers(0, 2**16),
)
@example(  # embeddings and layer 0 frozen: layer 0's K/V without a graph
    frozen_mask=[True] * 10 + [False] * 11, prompt_len=9, response_lens=[3, 1],
    attention="reference", tokens_per_microbatch=None, seed=0,
)  # fmt: skip
def test_any_frozen_subset_equals_dense_fp64(
    frozen_mask, prompt_len, response_lens, attention, tokens_per_microbatch, seed
):
    """Any subset of the reference decoder's parameters frozen (each one independently)."""
    model = tiny_reference(seed=seed % 5)
    params = list(model.parameters())
    for p, off in zip(params, frozen_mask, strict=True):
        p.requires_grad_(not off)
    if not any(p.requires_grad for p in params):
        params[-1].requires_grad_(True)
    groups = [random_group(prompt_len, response_lens, seed=seed)]
    dense = grads_of(model, lambda: dense_step(model, groups, pg_loss))
    got, _ = reuse(
        model, [groups], attention=attention, tokens_per_microbatch=tokens_per_microbatch
    )
    assert max_rel_diff(got, dense) <= 1e-12


def _count_backwards(monkeypatch) -> list[int]:
    calls = [0]
    real = torch.autograd.backward

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "backward", counting)
    return calls


@pytest.mark.parametrize("kind", ["reference", "Qwen3"])
def test_all_frozen_but_the_head_keeps_no_prompt_graph(kind, monkeypatch):
    """Phase A holds only the K/V (nothing saved for backward), phase C runs no backward."""
    base = tiny_reference() if kind == "reference" else tiny_hf(kind)
    groups = [[random_group(15, [1, 4, 7], seed=2)]]
    _, [trained] = reuse(base, groups)
    model = frozen(base, "head_only")
    calls = _count_backwards(monkeypatch)
    _, [stats] = reuse(model, groups)
    assert calls[0] == stats.microbatches == 3  # phase B's, none in phase C
    kv = 2 * 2 * kv_bytes_per_tensor(model, 15)
    assert stats.phases["A"].peak_bytes == stats.prompt_kv_bytes == kv
    assert trained.phases["A"].peak_bytes > 2 * kv  # a trainable model saves activations


@pytest.mark.parametrize("mode", ["per-trajectory", "global-batch"])
@pytest.mark.parametrize("pattern", ["lower", "head_only", "experts_last", "lora_qv"])
def test_moe_router_sums_without_a_graph(pattern, mode):
    """A MoE prompt's routing sums without a graph (every router and what feeds it frozen) get
    no gradient buffer either; the router loss is the dense trainer's."""
    model = frozen(tiny_moe(), pattern)
    groups = [random_group(13, [2, 6, 3], seed=4)]
    dense = grads_of(model, lambda: dense_step(model, groups, pg_loss, router_loss=mode))
    got, [stats] = reuse(model, [groups], router_loss=mode)
    assert grad_diff(got, dense) <= 1e-12
    assert stats.router is not None


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("pattern", ["lora_qv", "lower", "head_only"])
@pytest.mark.parametrize("kind", ["reference", "Llama"])
def test_offload_all_with_frozen_parameters_is_bitwise_same(kind, pattern):
    base = tiny_reference(torch.float32, layers=3) if kind == "reference" else tiny_hf(kind)
    model = frozen(base.float(), pattern)
    g = [random_group(40, [5, 9, 3], seed=1, dtype=torch.float32)]
    steps = [g, g, [random_group(23, [4, 2], seed=2, dtype=torch.float32)]]
    plain, _ = reuse(model, steps, offload="off", tokens_per_microbatch=16)
    moved, stats = reuse(model, steps, offload="all", tokens_per_microbatch=16)
    assert _equal(moved, plain)
    if pattern != "head_only":
        assert all(s.offload.engine.bytes_offloaded > 0 for s in stats)


@pytest.mark.parametrize("pattern", ["lora_qv", "lora_all", "lower"])
def test_budget_with_recompute_and_frozen_parameters_is_bitwise_same(pattern):
    """The first long prompt of a context plans before phase A from a probe, so the smallest
    budget recomputes layers in phase C; gradients are unchanged."""
    model = frozen(tiny_reference(torch.float32, layers=3), pattern)
    g = [random_group(300, [5, 9, 3], seed=5, dtype=torch.float32)]
    plain, _ = reuse(model, [g], offload="off", tokens_per_microbatch=16)
    with pytest.raises(hbmplan.BudgetError) as info:
        reuse(model, [g], hbm_budget=1, tokens_per_microbatch=16)
    budget = info.value.min_feasible
    moved, [stats] = reuse(model, [g], hbm_budget=budget, tokens_per_microbatch=16)
    assert _equal(moved, plain)
    plan = stats.offload.plan
    assert stats.offload.predicted and plan.recompute_bytes > 0 and plan.offload_bytes > 0
    # the planner works from the step's own capture: what frozen weights save nothing for is
    # not counted, and the measured peaks stay within the budget
    for name in ("B", "C"):
        assert stats.phases[name].peak_bytes <= budget, (name, stats.phases[name], budget)


def kernel_model(dtype, layers=2):
    """A reference decoder with head dim 64, which the Triton kernel takes."""
    return tiny_reference(dtype, layers=layers, heads=2, kv_heads=1, hidden=128)


@interpreted
@pytest.mark.parametrize(
    "pattern, deterministic",
    [("lora_qv", False), ("lora_qv", True), ("lower", False), ("head_only", False)],
)
def test_triton_path_with_frozen_parameters(pattern, deterministic):
    """The kernel adds prompt dK/dV only for K/V with a buffer (fp32 vs the fp64 dense)."""
    groups = [random_group(37, [5, 1, 12], seed=7, dtype=torch.float32)]
    m64 = frozen(kernel_model(torch.float64), pattern)
    ref = grads_of(m64, lambda: dense_step(m64, groups, pg_loss))
    m32 = frozen(kernel_model(torch.float32), pattern)
    got, [stats] = reuse(
        m32, [groups], attention="triton", tokens_per_microbatch=32, deterministic=deterministic
    )
    assert stats.attention == "triton"
    assert max_rel_diff(got, ref) < 1e-5
    assert stats.grad_cache_bytes == PATTERNS[pattern] * kv_bytes_per_tensor(m32, 37, 4)


def test_a_head_tied_to_the_embedding_keeps_the_prompt_graph():
    """Training only the head of a model whose head is its input embedding trains the embedding:
    phase A must keep its graph, and the prompt tokens' embedding gradient arrives in phase C."""
    import transformers

    config = tiny_hf("Qwen3").config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config).to(torch.float64)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model = frozen(model, "head_only")
    groups = [random_group(15, [1, 4, 7], seed=2)]
    dense = grads_of(model, lambda: dense_step(model, groups, pg_loss))
    got, [stats] = reuse(model, [groups])
    assert max_rel_diff(got, dense) <= 1e-6
    assert stats.grad_cache_bytes == 4 * kv_bytes_per_tensor(model, 15)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["lora_qv", "lower", "head_only"])
def test_frozen_parameters_on_cuda(pattern):
    """The Triton kernel on CUDA (bf16, fp32 cache) with K/V that need no gradient: within the
    tolerance rule of the fp64 dense gradients, no buffer for them, and offload through CUDA
    streams bitwise the same as without."""

    def model(dtype):
        m = tiny_reference(dtype, layers=4, hidden=512, heads=8, kv_heads=2, max_positions=4096)
        return frozen(m.to("cuda"), pattern)

    lens = [64, 17, 1, 40, 64, 33]
    groups = [random_group(512, lens, seed=0, device="cuda", dtype=torch.float32)]
    m64 = model(torch.float64)
    ref = grads_of(m64, lambda: dense_step(m64, groups, pg_loss))
    m16 = model(torch.bfloat16)
    dense16 = grads_of(m16, lambda: dense_step(m16, groups, pg_loss))
    got, [stats] = reuse(m16, [groups], tokens_per_microbatch=256)
    assert stats.attention == "triton"
    assert_tolerance_rule(got, dense16, ref)
    tensors = {"lora_qv": 7, "lower": 6, "head_only": 0}[pattern]  # of 2 x 4 layers
    assert stats.grad_cache_bytes == tensors * 2 * 511 * 64 * 4
    base, _ = reuse(m16, [groups] * 3, offload="off", tokens_per_microbatch=256)
    moved, _ = reuse(m16, [groups] * 3, offload="all", tokens_per_microbatch=256)
    assert _equal(moved, base)
