"""Phase B as packed rows through the prefix-attention kernel: the dense trainer's gradients, the
prompt K/V read in place, every model family, the router losses, offload, atomicity and the rules
``attention=`` enforces. The Triton kernel runs here under ``TRITON_INTERPRET=1``."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hbmplan
from hbmplan.kernels import launch
from hbmplan.models.hf import ATTENTION_NAME, packed_prefix_attention
from hbmplan.schedules import dense_step, reuse_step
from hbmplan.schedules.attention import context_len, resolve_attention
from hbmplan.schedules.microbatch import pack_rows, pack_tokens, unpack_rows
from tests.helpers import (
    assert_tolerance_rule,
    grads_of,
    max_rel_diff,
    pg_loss,
    random_group,
    tiny_hf,
    tiny_reference,
)
from tests.helpers.moe import grad_diff, tiny_hf_moe, tiny_moe

needs_triton = pytest.mark.skipif(
    not launch.detect().triton, reason="the triton package is not installed"
)
# The kernel runs here on CPU tensors, through Triton's interpreter (tests/conftest.py turns it on
# when no GPU is visible); tests/schedules/test_gpu.py runs the schedule's kernel path on CUDA.
interpreted = pytest.mark.skipif(
    not launch.detect().interpret, reason="runs the Triton kernel in its CPU interpreter"
)


def reuse_grads(model, groups, attention, tpm=None, loss=pg_loss, **kw):
    box = {}
    grads = grads_of(
        model,
        lambda: box.setdefault(
            "s", reuse_step(model, groups, loss, tpm, attention=attention, **kw)
        ),
    )
    return grads, box["s"]


def kernel_model(dtype, seed=0, layers=2):
    """A reference decoder with head dim 64, which the Triton kernel takes."""
    return tiny_reference(dtype, seed=seed, layers=layers, heads=2, kv_heads=1, hidden=128)


# ---- equality with the dense trainer ---------------------------------------------------------


@given(
    prompt_len=st.integers(2, 30),
    response_lens=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    n_groups=st.integers(1, 2),
    budget=st.one_of(st.none(), st.integers(1, 40)),
    seed=st.integers(0, 2**16),
)
def test_packed_reference_equals_dense_in_fp64(prompt_len, response_lens, n_groups, budget, seed):
    model = tiny_reference(seed=seed % 3)
    groups = [random_group(prompt_len, response_lens, seed=seed + i) for i in range(n_groups)]
    dense = grads_of(model, lambda: dense_step(model, groups, pg_loss))
    packed, stats = reuse_grads(model, groups, "reference", budget)
    assert stats.attention == "reference"
    assert max_rel_diff(packed, dense) < 1e-12


@interpreted
@settings(max_examples=12)
@given(
    prompt_len=st.integers(2, 40),
    response_lens=st.lists(st.integers(1, 20), min_size=1, max_size=4),
    budget=st.one_of(st.none(), st.integers(1, 48)),
    seed=st.integers(0, 2**16),
)
def test_triton_schedule_fp32_matches_fp64_dense(prompt_len, response_lens, budget, seed):
    """fp32 Triton-kernel steps: within fp32 roundoff (1e-5 relative, as the fp32 padded
    schedule) of the fp64 dense gradients."""
    groups = [random_group(prompt_len, response_lens, seed=seed, dtype=torch.float32)]
    m64 = kernel_model(torch.float64, seed=seed % 2)
    ref = grads_of(m64, lambda: dense_step(m64, groups, pg_loss))
    m32 = kernel_model(torch.float32, seed=seed % 2)
    triton, stats = reuse_grads(m32, groups, "triton", budget)
    assert stats.attention == "triton"
    assert max_rel_diff(triton, ref) < 1e-5


@interpreted
def test_triton_schedule_bf16_within_tolerance_rule():
    groups = [random_group(45, [1, 17, 33, 8], seed=3, dtype=torch.float32)]
    m64 = kernel_model(torch.float64)
    ref = grads_of(m64, lambda: dense_step(m64, groups, pg_loss))
    m16 = kernel_model(torch.bfloat16)
    dense16 = grads_of(m16, lambda: dense_step(m16, groups, pg_loss))
    triton, _ = reuse_grads(m16, groups, "triton", 40)
    assert_tolerance_rule(triton, dense16, ref)


@interpreted
def test_deterministic_triton_backward_is_bitwise_reproducible():
    model = kernel_model(torch.float32)
    groups = [random_group(70, [9, 30, 2], seed=4, dtype=torch.float32)]
    first, _ = reuse_grads(model, groups, "triton", 64, deterministic=True)
    second, _ = reuse_grads(model, groups, "triton", 64, deterministic=True)
    assert all(torch.equal(first[k], second[k]) for k in first)
    loose, _ = reuse_grads(model, groups, "triton", 64)
    assert max_rel_diff(loose, first) < 1e-5


@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Qwen3"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_packed_equals_dense_and_restores_attention(family, attn):
    model = tiny_hf(family, attn=attn)
    groups = [random_group(19, [1, 6, 11], seed=5), random_group(7, [3, 2], seed=6)]
    dense = grads_of(model, lambda: dense_step(model, groups, pg_loss))
    packed, stats = reuse_grads(model, groups, "reference", 12)
    assert stats.attention == "reference"
    assert max_rel_diff(packed, dense) < 1e-6
    assert model.config._attn_implementation == attn


@interpreted
def test_hf_triton_kernel_equals_padded():
    """An HF model whose head dim the kernel takes, through the registered attention function."""
    model = tiny_hf("Qwen3", dtype=torch.float32)
    model.config.head_dim = 64
    import transformers

    model = transformers.Qwen3ForCausalLM(model.config)
    groups = [random_group(33, [5, 1, 20], seed=7, dtype=torch.float32)]
    padded, _ = reuse_grads(model, groups, "padded", 32)
    triton, _ = reuse_grads(model, groups, "triton", 32)
    assert max_rel_diff(triton, padded) < 1e-5
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("mode", ["per-trajectory", "global-batch"])
def test_router_losses_with_packed_rows(mode):
    # HF keeps RoPE's inverse frequencies in fp32, hence its looser bound (as for padded rows)
    groups = [random_group(13, [4, 1, 7], seed=8), random_group(6, [2, 5], seed=9)]
    hf = [(tiny_hf_moe(family, coef=2.0), 1e-6) for family in ("Qwen3Moe", "Mixtral", "Qwen2Moe")]
    for model, bound in [(tiny_moe(z=0.05), 1e-12), *hf]:
        dense = grads_of(model, lambda m=model: dense_step(m, groups, pg_loss, router_loss=mode))
        packed, stats = reuse_grads(model, groups, "reference", 9, router_loss=mode)
        assert stats.router is not None
        assert grad_diff(packed, dense) < bound


# ---- memory: the prompt K/V are read in place ------------------------------------------------


@interpreted
def test_packed_kernel_holds_no_per_row_copy_of_the_prompt_kv():
    """With G rows in one microbatch, padded rows each concatenate the prompt K/V (and attention
    keeps the concatenation for backward); the kernel keeps none, so phase B's held bytes drop by
    at least G copies."""
    model = kernel_model(torch.float32)
    G = 6
    groups = [random_group(400, [8] * G, seed=10, dtype=torch.float32)]
    _, padded = reuse_grads(model, groups, "padded", 10_000)
    _, packed = reuse_grads(model, groups, "triton", 10_000)
    drop = padded.phases["B"].peak_bytes - packed.phases["B"].peak_bytes
    assert drop >= G * packed.prompt_kv_bytes, (drop, packed.prompt_kv_bytes)


@interpreted
def test_offload_with_packed_rows_is_bitwise_same():
    model = kernel_model(torch.float32, layers=3)
    groups = [random_group(64, [5, 9, 3], seed=11, dtype=torch.float32)]

    def run(offload):
        def fn():
            with hbmplan.memory(model, offload=offload, attention="triton") as mem:
                for _ in range(3):  # planned, then streamed twice
                    mem.step(groups, pg_loss, tokens_per_microbatch=16)

        return grads_of(model, fn)

    base, moved = run("off"), run("all")
    assert all(torch.equal(base[k], moved[k]) for k in base)


@interpreted
def test_failed_packed_step_restores_grads():
    model = kernel_model(torch.float32)
    groups = [random_group(30, [4, 6, 2], seed=12, dtype=torch.float32)]
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}

    def loss(logprobs, group, i):
        if i == 2:
            raise RuntimeError("boom")
        return pg_loss(logprobs, group, i)

    with (
        hbmplan.memory(model, attention="triton") as mem,
        pytest.raises(RuntimeError, match="boom"),
    ):
        mem.step(groups, loss)
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
    assert mem.report().failed_steps == 1


# ---- choosing the path, and the errors -------------------------------------------------------


def test_auto_is_padded_off_cuda_and_report_names_the_path():
    model = tiny_reference()
    groups = [random_group(9, [3, 4])]
    choice = resolve_attention("auto", hbmplan.models.adapt(model), groups, torch.float64, None)
    assert not choice.packed and "cpu" in choice.why
    with hbmplan.memory(model, attention="reference") as mem:
        stats = mem.step(groups, pg_loss)
    assert stats.attention == "reference"
    assert "phase B attention: reference" in str(mem.report())
    with hbmplan.memory(model) as mem:
        mem.step(groups, pg_loss)
    assert "phase B attention: padded (auto: the groups are on cpu, not CUDA)" in str(mem.report())


def test_context_len_is_prompt_kv_plus_longest_row():
    groups = [random_group(9, [3, 4]), random_group(5, [10])]
    assert context_len(groups) == max(8 + 4, 4 + 10)


@needs_triton
@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        (dict(attention="flash"), ValueError, "attention must be one of"),
        (dict(attention="triton"), ValueError, "dtype must be bf16, fp16 or fp32"),
        (dict(attention="triton", grad_cache_dtype=torch.float32), ValueError, "dtype must"),
        (dict(deterministic=1), TypeError, "deterministic must be a bool"),
    ],
)
def test_bad_attention_arguments_fail_before_any_state_changes(kw, error, match):
    model = kernel_model(torch.float64)  # the Triton kernel takes no fp64
    groups = [random_group(9, [3, 4])]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(error, match=match):
        reuse_step(model, groups, pg_loss, **kw)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


@needs_triton
def test_triton_rejects_head_dims_and_cache_dtypes_it_cannot_take():
    groups = [random_group(9, [3, 4], dtype=torch.float32)]
    with pytest.raises(ValueError, match="head dim must be one of"):
        reuse_step(tiny_reference(torch.float32), groups, pg_loss, attention="triton")
    with pytest.raises(ValueError, match="grad_cache must be float32 for Triton"):
        reuse_step(
            kernel_model(torch.float32),
            groups,
            pg_loss,
            attention="triton",
            grad_cache_dtype=torch.bfloat16,
        )


def test_sliding_window_shorter_than_context_refuses_packed_rows():
    model = tiny_hf("Mistral")  # window 12
    short = [random_group(6, [3, 2])]
    long = [random_group(20, [3, 2])]
    dense = grads_of(model, lambda: dense_step(model, short, pg_loss))
    packed, _ = reuse_grads(model, short, "reference")
    assert max_rel_diff(packed, dense) < 1e-6
    with pytest.raises(ValueError, match="sliding window of 12 tokens, shorter than the context"):
        reuse_step(model, long, pg_loss, attention="reference")
    adapter = hbmplan.models.adapt(model)
    assert not resolve_attention("auto", adapter, long, torch.float64, None).packed


def test_hf_gradient_checkpointing_is_refused_before_any_state_changes():
    model = tiny_hf("Llama")
    kwargs = {"use_reentrant": False}  # transformers renamed the method and its argument
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    groups = [random_group(9, [3, 4])]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    for attention in ("padded", "reference"):
        with pytest.raises(ValueError, match="gradient checkpointing must be off"):
            reuse_step(model, groups, pg_loss, attention=attention)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    model.eval()  # HF checkpoints only in training mode: the schedule then runs
    for p in model.parameters():
        p.grad = None
    dense = grads_of(model, lambda: dense_step(model, groups, pg_loss))
    assert max_rel_diff(reuse_grads(model, groups, "reference")[0], dense) < 1e-6


def test_registered_attention_refuses_calls_outside_the_schedule():
    q = torch.zeros(1, 2, 3, 8)
    with pytest.raises(RuntimeError, match=ATTENTION_NAME):
        packed_prefix_attention(torch.nn.Module(), q, q, q, None)


# ---- packing ---------------------------------------------------------------------------------


PACKINGS = [(pack_tokens, sum), (pack_rows, lambda ns: len(ns) * max(ns))]


@given(
    lengths=st.lists(st.integers(1, 50), min_size=1, max_size=12),
    budget=st.one_of(st.none(), st.integers(1, 120)),
    packing=st.sampled_from(PACKINGS),
)
def test_packing_keeps_order_and_budget(lengths, budget, packing):
    split, cost = packing  # packed rows: total tokens; padded rows: rows x longest row
    batches = split(lengths, budget)
    assert [i for b in batches for i in b] == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or (budget is not None and cost([lengths[i] for i in b]) <= budget)
    if budget is not None:  # greedy: the next row would not have fit
        for b, nxt in itertools.pairwise(batches):
            assert cost([lengths[i] for i in [*b, nxt[0]]]) > budget


def test_unpack_rows_pads_each_row():
    x = torch.arange(12.0).reshape(1, 6, 2)
    rows = unpack_rows(x, [1, 3, 2])
    assert rows.shape == (3, 3, 2)
    assert rows[0, 0].tolist() == [0.0, 1.0] and rows[0, 1:].abs().sum() == 0
    assert rows[1].tolist() == [[2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]
    assert rows[2, :2].tolist() == [[8.0, 9.0], [10.0, 11.0]]
