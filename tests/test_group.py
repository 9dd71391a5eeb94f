"""Every rejected input: error type and message asserted, .grad unchanged, before any state change."""

from __future__ import annotations

import pytest
import torch

import hbmplan
from hbmplan.group import Group
from hbmplan.schedules import dense_step, reuse_step
from tests.helpers import VOCAB, pg_loss, random_group, tiny_reference

ids = torch.arange(5)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(prompt=[1, 2, 3], responses=[ids]), TypeError, "prompt must be a torch.Tensor"),
        (dict(prompt=ids.float(), responses=[ids]), TypeError, "prompt must hold integer token ids, got dtype torch.float32"),
        (dict(prompt=ids[None], responses=[ids]), ValueError, r"prompt must be 1-D \[length\], got shape \(1, 5\)"),
        (dict(prompt=ids[:1], responses=[ids]), ValueError, "prompt must have length >= 2.*got length 1"),
        (dict(prompt=ids, responses=[]), ValueError, "non-empty list \\(G >= 1\\), got 0"),
        (dict(prompt=ids, responses=ids), TypeError, "responses must be a list of 1-D token tensors, got Tensor"),
        (dict(prompt=ids, responses=[ids, ids[:0]]), ValueError, "responses must be non-empty, got response 1 of length 0"),
        (dict(prompt=ids, responses=[ids.reshape(5, 1)]), ValueError, r"response 0 must be 1-D"),
        (dict(prompt=ids, responses=[ids], data=[1]), TypeError, "data must be a mapping, got list"),
        (dict(prompt=ids, responses=[ids.to("meta")]), ValueError, "one device, got prompt on cpu and response 0 on meta"),
    ],
)  # fmt: skip
def test_group_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Group(**kwargs)


def test_group_properties():
    g = Group(prompt=ids, responses=[ids[:2], ids[:3]])
    assert (g.group_size, g.prompt_len, g.response_lens, g.trajectory_len(1)) == (2, 5, [2, 3], 7)


def _with_grads(model):
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "groups, exc, match",
    [
        (lambda: [Group(torch.tensor([1, VOCAB]), [ids])], ValueError, f"vocab_size={VOCAB}\\), got id {VOCAB} in groups\\[0\\]"),
        (lambda: [Group(torch.tensor([1, -1]), [ids])], ValueError, "got id -1 in groups\\[0\\]"),
        (lambda: [Group(torch.zeros(500, dtype=torch.long), [torch.zeros(20, dtype=torch.long)])], ValueError, "max positions 512, got 519"),
        (lambda: [], ValueError, "groups must be a non-empty list"),
        (lambda: Group(ids, [ids]), TypeError, "groups must be a list of hbmplan.Group, got Group"),
        (lambda: [ids], TypeError, r"groups\[0\] must be an hbmplan.Group, got Tensor"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("runner", ["memory", "reuse", "dense"])
def test_model_checks_reject_before_any_state_change(groups, exc, match, runner):
    model = tiny_reference()
    before = _with_grads(model)
    with pytest.raises(exc, match=match):
        if runner == "memory":
            with hbmplan.memory(model) as mem:
                mem.step(groups(), pg_loss)
        elif runner == "reuse":
            reuse_step(model, groups(), pg_loss)
        else:
            dense_step(model, groups(), pg_loss)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, before[n]), n


@pytest.mark.parametrize(
    "value, exc, match",
    [(0, ValueError, "tokens_per_microbatch must be >= 1, got 0"),
     (2.5, TypeError, "tokens_per_microbatch must be an int or None, got float"),
     (True, TypeError, "got bool")],
)  # fmt: skip
def test_tokens_per_microbatch_checked(value, exc, match):
    model = tiny_reference()
    with pytest.raises(exc, match=match):
        hbmplan.memory(model, tokens_per_microbatch=value)
    with pytest.raises(exc, match=match):
        dense_step(model, [random_group(4, [2])], pg_loss, value)


def test_unsupported_model_lists_what_is_supported():
    with pytest.raises(
        ValueError, match=r"unsupported model Linear.*\['llama', 'mistral', 'qwen2', 'qwen3'\]"
    ):
        hbmplan.memory(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="must be a torch.nn.Module, got str"):
        hbmplan.memory("llama")


def test_tokens_on_another_device_rejected():
    group = Group(prompt=ids.to("meta"), responses=[ids.to("meta")])
    with pytest.raises(ValueError, match="model's device cpu, got groups\\[0\\] on meta"):
        reuse_step(tiny_reference(), [group], pg_loss)


def test_unsupported_hf_family_lists_supported():
    import transformers

    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32)
    with pytest.raises(ValueError, match=r"unsupported Hugging Face model_type 'gpt2'.*'qwen3'"):
        hbmplan.memory(transformers.GPT2LMHeadModel(cfg))
