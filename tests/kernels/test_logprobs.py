"""Chunked log-probs: the plain formula's values and gradients, with no [N, V] kept for backward;
the schedules switch to them above LOGITS_BUDGET and train the same."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from hbmplan.kernels import logprobs
from hbmplan.kernels.logprobs import chunk_rows, chunked_token_logprobs, token_logprobs_ref
from hbmplan.schedules import dense_step, microbatch, reuse_step
from tests.helpers import (
    assert_tolerance_rule,
    grads_of,
    max_rel_diff,
    pg_loss,
    random_group,
    tiny_hf,
    tiny_reference,
)


def _inputs(n, vocab, width, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, width, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=g, dtype=torch.float64) / width**0.5
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    upstream = torch.randn(n, generator=g, dtype=torch.float64)
    xs = [x.to(dtype).requires_grad_() if x is not None else None for x in (hidden, weight, b)]
    return xs, targets, upstream


def _run(fn, xs, targets, upstream, out_dtype, **kw):
    out = fn(xs[0], xs[1], xs[2], targets, dtype=out_dtype, **kw)
    out.backward(upstream.to(out.dtype))
    grads = [x.grad.clone() if x is not None else None for x in xs]
    for x in xs:
        if x is not None:
            x.grad = None
    return out.detach(), grads


@given(
    n=st.integers(1, 40),
    vocab=st.integers(2, 50),
    width=st.integers(1, 12),
    chunk=st.integers(1, 45),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_equals_plain_formula_in_fp64(n, vocab, width, chunk, bias, seed):
    xs, targets, upstream = _inputs(n, vocab, width, bias, torch.float64, seed)
    want, want_grads = _run(token_logprobs_ref, xs, targets, upstream, torch.float64)
    got, got_grads = _run(chunked_token_logprobs, xs, targets, upstream, torch.float64, chunk=chunk)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads, strict=True):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_low_precision_within_tolerance_rule(dtype):
    xs64, targets, upstream = _inputs(70, 300, 32, True, torch.float64, 1)
    _, ref = _run(token_logprobs_ref, xs64, targets, upstream, torch.float64)
    xs = [x.detach().to(dtype).requires_grad_() for x in xs64]
    _, plain = _run(token_logprobs_ref, xs, targets, upstream, torch.float32)
    _, chunked = _run(chunked_token_logprobs, xs, targets, upstream, torch.float32, chunk=16)
    names = ["hidden", "weight", "bias"]
    assert_tolerance_rule(
        dict(zip(names, chunked, strict=True)),
        dict(zip(names, plain, strict=True)),
        dict(zip(names, ref, strict=True)),
        dtype=dtype,
    )


def test_chunk_rows_chunks_only_when_it_saves_memory(monkeypatch):
    monkeypatch.setattr(logprobs, "LOGITS_BUDGET", 4000)  # 10 rows of V=100 fp32
    assert chunk_rows(10, 100, 8, 2) is None  # fits one chunk
    # plain 11 x 100 x (2 + 12) against chunks 10 x 100 x (2 + 8) + weight grad 100 x h x (4 + 2)
    assert chunk_rows(11, 100, 8, 2) == 10  # 15400 > 10000 + 4800
    assert chunk_rows(11, 100, 20, 2) is None  # 15400 < 10000 + 12000
    assert chunk_rows(1000, 100, 8, 2) == 10
    assert chunk_rows(1000, 100, 10_000, 2) is None  # the fp32 weight gradient would cost more
    monkeypatch.setattr(logprobs, "LOGITS_BUDGET", 10)
    assert chunk_rows(1000, 100, 8, 2) == 1  # never below one row


def test_one_chunk_of_all_rows_when_that_needs_less_than_the_plain_formula(monkeypatch):
    monkeypatch.setattr(logprobs, "LOGITS_BUDGET", 4000)  # 10 rows of V=100 fp32
    # plain 10 x 100 x (2 + 12) = 14000 against one chunk 10 x 100 x (2 + 8) + 100 x 2 x 6 + 40
    assert chunk_rows(10, 100, 2, 2) == 10
    assert chunk_rows(4, 100, 2, 2) == 4  # 5600 against 4000 + 1200 + 16
    assert chunk_rows(1, 100, 2, 2) is None  # 1400 against 1000 + 1200 + 4


def _chosen_bytes(n, vocab, width, itemsize, acc):
    chunk = chunk_rows(n, vocab, width, itemsize, acc)
    return sum(logprobs.logprob_bytes(n, vocab, width, itemsize, acc, chunk))


# Issue 11: before, N <= LOGITS_BUDGET / (4 V) rows (8371 here) always took the plain formula, so
# one token more switched to chunks and needed 0.29 GB less (V = 32064, h = 4096: Llama3-8B, tp=4).
@example(n=8371, vocab=32064, width=4096, itemsize=2, budget=1 << 30)
@given(
    n=st.integers(1, 5000),
    vocab=st.integers(2, 3000),
    width=st.integers(1, 600),
    itemsize=st.sampled_from([2, 4, 8]),
    budget=st.sampled_from([1, 4000, 1 << 16, 1 << 20]),
)
def test_chosen_log_prob_bytes_are_the_least_and_never_fall_with_more_tokens(
    n, vocab, width, itemsize, budget
):
    """What the choice adds to a step's peak (held plus working bytes at the LM head's
    backward) is the lesser of the two ways, and one more token never needs less: a longer
    microbatch never fits where a shorter one did not (the capacity frontier relies on it)."""
    acc = 8 if itemsize == 8 else 4
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(logprobs, "LOGITS_BUDGET", budget)
        chosen = _chosen_bytes(n, vocab, width, itemsize, acc)
        more = _chosen_bytes(n + 1, vocab, width, itemsize, acc)
    rows = max(1, budget // (vocab * acc))
    plain = sum(logprobs.logprob_bytes(n, vocab, width, itemsize, acc))
    chunked = sum(logprobs.logprob_bytes(n, vocab, width, itemsize, acc, min(rows, n)))
    assert chosen == min(plain, chunked)
    assert more >= chosen


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(chunk=0), "chunk must be an int >= 1"),
        (dict(chunk=True), "chunk must be an int >= 1"),
        (dict(chunk=4, targets=torch.zeros(3, dtype=torch.long)), "targets must be"),
    ],
)
def test_bad_arguments(kw, match):
    hidden, weight = torch.randn(5, 4), torch.randn(7, 4)
    args = dict(targets=torch.zeros(5, dtype=torch.long)) | kw
    with pytest.raises(ValueError, match=match):
        chunked_token_logprobs(hidden, weight, None, args["targets"], args["chunk"])


# ---- in the schedules --------------------------------------------------------------------------


def _both(model, groups, tpm=8):
    dense = grads_of(model, lambda: dense_step(model, groups, pg_loss, tpm))
    reuse = grads_of(model, lambda: reuse_step(model, groups, pg_loss, tpm))
    return dense, reuse


def _chunking(monkeypatch, rows):
    """Chunks of ``rows`` rows from here on; returns the list of chunk sizes the schedules used."""
    monkeypatch.setattr(logprobs, "chunk_rows", lambda n, *_: rows if n > rows else None)
    used = []
    real = microbatch.chunked_token_logprobs

    def spy(*args):
        used.append(args[4])
        return real(*args)

    monkeypatch.setattr(microbatch, "chunk_rows", logprobs.chunk_rows)
    monkeypatch.setattr(microbatch, "chunked_token_logprobs", spy)
    return used


@pytest.mark.parametrize(
    "make",
    [tiny_reference, lambda: tiny_hf("Qwen3"), lambda: tiny_hf("Llama")],
    ids=["reference", "qwen3", "llama"],  # stable ids: pytest-xdist workers must agree
)
def test_schedules_train_the_same_with_chunked_logprobs(make, monkeypatch):
    model = make()
    groups = [random_group(11, [5, 1, 8], seed=2), random_group(6, [3, 4], seed=3)]
    plain = _both(model, groups)
    used = _chunking(monkeypatch, 3)
    chunked = _both(model, groups)
    assert used and set(used) == {3}
    for a, b in zip(chunked, plain, strict=True):
        assert max_rel_diff(a, b) < 1e-12


def test_tied_embeddings_get_both_gradients(monkeypatch):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).double()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    groups = [random_group(9, [4, 6], seed=4)]
    plain = _both(model, groups)
    used = _chunking(monkeypatch, 2)
    for a, b in zip(_both(model, groups), plain, strict=True):
        assert max_rel_diff(a, b) < 1e-12
    assert used


def test_chunking_drops_the_log_softmax_from_phase_b(monkeypatch):
    """Held bytes of phase B fall by the fp32 [N, V] log-softmax (less the [N] logsumexps)."""
    model = tiny_reference(torch.float32)
    groups = [random_group(20, [30, 30], seed=5, dtype=torch.float32)]

    def peak_b():
        stats = reuse_step(model, groups, pg_loss, 60)
        model.zero_grad(set_to_none=True)
        return stats.phases["B"].peak_bytes

    plain = peak_b()
    used = _chunking(monkeypatch, 4)
    drop = plain - peak_b()
    assert used == [4]  # one microbatch of both rows
    n, vocab = 60, 61
    assert drop == n * vocab * 4 - n * 4, drop


def test_heads_the_chunked_path_cannot_reproduce_take_the_plain_formula(monkeypatch):
    """A hook on the head, or autocast, would be skipped or mishandled by the chunked Function:
    those steps use the plain formula."""
    model = tiny_reference(torch.float32)
    groups = [random_group(11, [5, 8], seed=6, dtype=torch.float32)]
    used = _chunking(monkeypatch, 3)
    handle = model.lm_head.register_forward_hook(lambda *_: None)
    reuse_step(model, groups, pg_loss, 16)
    handle.remove()
    assert used == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reuse_step(model, groups, pg_loss, 16)
    assert used == []
    reuse_step(model, groups, pg_loss, 16)
    assert used == [3]
