"""Factories shared by the tests: tiny models, random groups, gradient comparison."""

from __future__ import annotations

import torch

import hbmplan
from hbmplan.models import DecoderConfig, ReferenceDecoder

VOCAB = 61


def tiny_reference(
    dtype=torch.float64, seed=0, layers=2, heads=4, kv_heads=2, hidden=32, max_positions=512
):
    torch.manual_seed(seed)
    cfg = DecoderConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, intermediate_size=48, max_positions=max_positions,
    )  # fmt: skip
    return ReferenceDecoder(cfg).to(dtype)


def tiny_hf(family: str, dtype=torch.float64, seed=0, attn="sdpa"):
    import transformers

    torch.manual_seed(seed)
    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    kw = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    if family == "Qwen3":
        kw["head_dim"] = 8
    if family == "Mistral":
        kw["sliding_window"] = 12  # shorter than the test sequences: the window is exercised
    config = config_cls(**kw)
    config._attn_implementation = attn
    return model_cls(config).to(dtype)


def random_group(prompt_len, response_lens, seed=0, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, VOCAB, (prompt_len,), generator=g)
    responses = [torch.randint(0, VOCAB, (s,), generator=g) for s in response_lens]
    adv = torch.randn(len(response_lens), generator=g, dtype=torch.float64)
    return hbmplan.Group(
        prompt=prompt.to(device),
        responses=[r.to(device) for r in responses],
        data={"advantages": adv.to(device=device, dtype=dtype)},
    )


def pg_loss(logprobs, group, i):
    """A policy-gradient loss with a nonlinearity, so every token matters differently."""
    adv = group.data["advantages"][i].to(logprobs.dtype)
    return -(adv * logprobs).sum() + 0.1 * (logprobs**2).mean()


def grads_of(model, fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    fn()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over parameters of max|a - b| / max|b|; both must hold the same parameters.

    A parameter whose gradient is zero in exact arithmetic (e.g. attention over identical keys)
    holds only roundoff, so its scale is floored at 1e-6 of the largest gradient of the model.
    """
    assert a.keys() == b.keys(), f"different parameters got gradients: {a.keys() ^ b.keys()}"
    top = max(t.abs().max().item() for t in b.values())
    worst = 0.0
    for n in b:
        scale = max(b[n].abs().max().item(), 1e-6 * top, 1e-300)
        worst = max(worst, (a[n].double() - b[n].double()).abs().max().item() / scale)
    return worst


def assert_tolerance_rule(x, dense, ref, dtype=torch.bfloat16) -> None:
    """Per parameter: |x - ref| <= 2 |dense - ref| + atol, atol the ``dtype`` rounding of ``ref``
    itself (a result cannot be closer than its own storage). docs/design.md's tolerance rule."""
    for name, r in ref.items():
        err = (x[name].double() - r).abs().max().item()
        err_dense = (dense[name].double() - r).abs().max().item()
        atol = (r.to(dtype).double() - r).abs().max().item()
        assert err <= 2 * err_dense + atol, (name, err, err_dense, atol)


def replay_spy(monkeypatch) -> list[int]:
    """The layers the saved-tensor capture replays from here on, in order."""
    from hbmplan.runtime import capture as capture_mod

    layers: list[int] = []
    real = capture_mod.SavedTensorCapture._replay

    def spy(self, layer):
        layers.append(layer)
        return real(self, layer)

    monkeypatch.setattr(capture_mod.SavedTensorCapture, "_replay", spy)
    return layers
