"""ReuseConfig.temperature and .entropy: log-probs of logits / temperature, as TRL scores the
tokens it sampled, and each token's entropy, on every log-prob path (plain, chunked; padded and
packed rows)."""

from __future__ import annotations

import pytest
import torch

from hbmplan.kernels.logprobs import chunked_token_logprobs, token_logprobs_ref
from hbmplan.schedules import reuse_step
from tests.helpers import random_group, tiny_hf


def test_chunked_log_probs_with_temperature_equal_the_plain_formula():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    tok = torch.randint(0, 11, (13,), generator=g)
    up = torch.randn(13, generator=g, dtype=torch.float64)
    want = token_logprobs_ref(h, w, b, tok, torch.float64, temperature=0.6)
    want_grads = torch.autograd.grad(want, (h, w, b), up)
    ent = torch.empty(13, dtype=torch.float64)
    got = chunked_token_logprobs(h, w, b, tok, 4, torch.float64, temperature=0.6, entropy=ent)
    got_grads = torch.autograd.grad(got, (h, w, b), up)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for x, y in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    logp = (torch.nn.functional.linear(h, w, b) / 0.6).log_softmax(-1)
    torch.testing.assert_close(ent, -(logp.exp() * logp).sum(-1).detach(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="entropy must be a torch.float64 tensor of shape"):
        chunked_token_logprobs(h, w, b, tok, 4, torch.float64, entropy=torch.empty(3))


@pytest.mark.parametrize("attention", ["padded", "reference"])
def test_reuse_log_probs_and_entropy_are_those_of_logits_over_temperature(attention):
    model = tiny_hf("Qwen3")
    group = random_group(12, [4, 1, 6], seed=3)
    seen = {}

    def loss_fn(logprobs, grp, i):
        seen[i] = logprobs.detach()
        return logprobs.sum()

    stats = reuse_step(
        model, [group], loss_fn, 16, attention=attention, temperature=0.7, entropy=True
    )
    for i, r in enumerate(group.responses):
        ids = torch.cat([group.prompt, r])[None]
        logits = model(ids).logits[0, group.prompt_len - 1 : -1].detach() / 0.7
        logp = logits.log_softmax(-1)
        torch.testing.assert_close(seen[i], logp.gather(-1, r[:, None])[:, 0])
        torch.testing.assert_close(stats.token_entropy[0][i], -(logp.exp() * logp).sum(-1))
    assert reuse_step(model, [group], loss_fn).token_entropy is None
