"""hbmplan.losses: values against a hand-written formula, gradients, clipping, KL, aggregation
over a group, every rejected input, and the loss run end-to-end through both schedules."""

import dataclasses
import math
import re
import statistics

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hbmplan
from hbmplan.losses import PolicyLoss, group_advantages

F64 = torch.float64


def make_group(lens, seed=0, per_token_adv=False, old=True, ref=True, old_noise=0.5):
    """A group with responses of ``lens`` and random data; returns (group, leaf logprobs)."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 50, (5,), generator=gen)
    responses = [torch.randint(0, 50, (s,), generator=gen) for s in lens]
    lps = [(-3 * torch.rand(s, generator=gen, dtype=F64)).requires_grad_() for s in lens]
    if per_token_adv:
        adv = [torch.randn(s, generator=gen, dtype=F64) for s in lens]
    else:
        adv = torch.randn(len(lens), generator=gen, dtype=F64)
    data = {"advantages": adv}
    if old:
        noise = [old_noise * torch.randn(s, generator=gen, dtype=F64) for s in lens]
        data["old_logprobs"] = [lp.detach() + n for lp, n in zip(lps, noise, strict=True)]
    if ref:
        noise = [0.3 * torch.randn(s, generator=gen, dtype=F64) for s in lens]
        data["ref_logprobs"] = [lp.detach() + n for lp, n in zip(lps, noise, strict=True)]
    return hbmplan.Group(prompt=prompt, responses=responses, data=data), lps


def hand_token(lp, old, ref, adv, lo, hi, dual, kl):
    """The per-token loss, written out with Python floats."""
    r = math.exp(lp - old)
    objective = min(r * adv, min(max(r, 1 - lo), 1 + hi) * adv)
    if dual is not None and adv < 0:
        objective = max(objective, dual * adv)
    d = ref - lp
    return -objective + kl * (math.exp(d) - d - 1)


def hand_tokens(group, lps, i, lo=0.2, hi=0.2, dual=None, kl=0.0):
    data, S = group.data, group.response_lens[i]
    lp = lps[i].tolist()
    old = data["old_logprobs"][i].tolist() if "old_logprobs" in data else lp
    ref = data["ref_logprobs"][i].tolist() if "ref_logprobs" in data else lp
    adv = data["advantages"]
    adv = [float(adv[i])] * S if isinstance(adv, torch.Tensor) else adv[i].tolist()
    return [hand_token(lp[t], old[t], ref[t], adv[t], lo, hi, dual, kl) for t in range(S)]


def hand_weight(aggregation, lens, i):
    return {
        "token-mean": 1 / sum(lens),
        "sequence-mean": 1 / (lens[i] * len(lens)),
        "token-sum": 1.0,
    }[aggregation]


def grad(loss, x):
    return torch.autograd.grad(loss, x)[0]


lengths = st.lists(st.integers(1, 6), min_size=1, max_size=5)
aggregations = st.sampled_from(["token-mean", "sequence-mean", "token-sum"])


@given(
    lens=lengths,
    seed=st.integers(0, 2**16),
    aggregation=aggregations,
    lo=st.floats(0, 0.5),
    hi=st.floats(0, 0.5),
    dual=st.none() | st.floats(1.5, 5),
    kl=st.floats(0, 1),
    scale=st.floats(0.1, 3),
    per_token_adv=st.booleans(),
)
def test_value_matches_hand_formula(
    lens, seed, aggregation, lo, hi, dual, kl, scale, per_token_adv
):
    group, lps = make_group(lens, seed, per_token_adv)
    loss = PolicyLoss(lo, hi, dual, kl, aggregation, scale)
    for i in range(len(lens)):
        got = loss(lps[i], group, i)
        tokens = hand_tokens(group, lps, i, lo, hi, dual, kl)
        want = scale * hand_weight(aggregation, lens, i) * math.fsum(tokens)
        assert got.dtype == F64 and got.shape == ()
        assert math.isclose(got.item(), want, rel_tol=1e-12, abs_tol=1e-14)


@given(lens=lengths, seed=st.integers(0, 2**16), dual=st.none() | st.floats(1.5, 5))
def test_group_sum_is_mean_over_tokens(lens, seed, dual):
    group, lps = make_group(lens, seed, per_token_adv=True)
    per_response = [hand_tokens(group, lps, i, dual=dual, kl=0.3) for i in range(len(lens))]

    token_mean = PolicyLoss(dual_clip=dual, kl_coef=0.3)
    total = sum(token_mean(lps[i], group, i) for i in range(len(lens)))
    want = statistics.fmean([t for tokens in per_response for t in tokens])
    assert math.isclose(total.item(), want, rel_tol=1e-12, abs_tol=1e-14)

    sequence_mean = PolicyLoss(dual_clip=dual, kl_coef=0.3, aggregation="sequence-mean")
    total = sum(sequence_mean(lps[i], group, i) for i in range(len(lens)))
    want = statistics.fmean([statistics.fmean(tokens) for tokens in per_response])
    assert math.isclose(total.item(), want, rel_tol=1e-12, abs_tol=1e-14)


@pytest.mark.parametrize("aggregation", ["token-mean", "sequence-mean", "token-sum"])
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_on_policy_gradient_is_advantage_times_weight(aggregation, per_token_adv, eps):
    lens = [3, 1, 4]
    group, lps = make_group(lens, seed=1, per_token_adv=per_token_adv, old=False, ref=False)
    loss = PolicyLoss(clip_eps_low=eps, aggregation=aggregation, scale=0.5)
    adv = group.data["advantages"]
    for i, S in enumerate(lens):
        value = loss(lps[i], group, i)
        a = adv[i].expand(S) if isinstance(adv, torch.Tensor) else adv[i]
        w = 0.5 * hand_weight(aggregation, lens, i)
        torch.testing.assert_close(value, -(a * w).sum(), rtol=1e-14, atol=0)
        torch.testing.assert_close(grad(value, lps[i]), -a * w, rtol=1e-14, atol=0)


def clip_case(ratios, adv):
    """One response per advantage, each with the given ratios against old log-probs."""
    r = torch.tensor(ratios, dtype=F64)
    lps = [(-1 - torch.arange(len(ratios), dtype=F64) / 7).requires_grad_() for _ in adv]
    old = [lp.detach() - r.log() for lp in lps]
    n = len(ratios)
    group = hbmplan.Group(
        prompt=torch.tensor([1, 2]),
        responses=[torch.ones(n, dtype=torch.long) for _ in adv],
        data={"advantages": torch.tensor(adv, dtype=F64), "old_logprobs": old},
    )
    return group, lps, r


@pytest.mark.parametrize("lo, hi", [(0.2, 0.2), (0.2, 0.28), (0.28, 0.2), (0.0, 0.5)])
def test_clipping_zeroes_gradient_exactly_where_clipped(lo, hi):
    ratios = [0.5, 0.7, 0.75, 0.79, 0.81, 1.0, 1.1, 1.19, 1.21, 1.27, 1.29, 1.6, 3.0]
    group, lps, r = clip_case(ratios, adv=[1.5, -1.5])
    loss = PolicyLoss(clip_eps_low=lo, clip_eps_high=hi, aggregation="token-sum")
    for i, a in enumerate([1.5, -1.5]):
        g = grad(loss(lps[i], group, i), lps[i])
        clipped = r > 1 + hi if a > 0 else r < 1 - lo
        assert torch.equal(g == 0, clipped), (a, g)
        torch.testing.assert_close(g[~clipped], -a * r[~clipped], rtol=1e-14, atol=0)


def test_clip_higher_is_asymmetric():
    group, lps, _ = clip_case([0.75, 1.25], adv=[1.0, -1.0])
    symmetric = PolicyLoss(clip_eps_low=0.2)
    higher = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28)
    assert higher.clip_eps_high == 0.28 and symmetric.clip_eps_high == 0.2
    # A > 0 at ratio 1.25: clipped at 1.2 (no gradient), inside 1.28 (gradient).
    assert grad(symmetric(lps[0], group, 0), lps[0])[1] == 0
    assert grad(higher(lps[0], group, 0), lps[0])[1] != 0
    # A < 0 at ratio 0.75: clipped at 0.8 in both, the low side is unchanged.
    assert grad(symmetric(lps[1], group, 1), lps[1])[0] == 0
    assert grad(higher(lps[1], group, 1), lps[1])[0] == 0


def test_dual_clip_caps_negative_advantage_loss():
    ratios = [0.5, 1.0, 2.0, 2.9, 3.1, 10.0]
    group, lps, r = clip_case(ratios, adv=[1.0, -2.0])
    dual = PolicyLoss(dual_clip=3.0, aggregation="token-sum")
    plain = PolicyLoss(aggregation="token-sum")

    got = dual(lps[1], group, 1)
    want = math.fsum(2 * min(max(x, 0.8), 3.0) for x in ratios)  # -A * clamp(r) with A = -2
    assert math.isclose(got.item(), want, rel_tol=1e-13)
    g = grad(got, lps[1])
    zero = (r < 0.8) | (r > 3.0)
    assert torch.equal(g == 0, zero)
    torch.testing.assert_close(g[~zero], 2 * r[~zero], rtol=1e-14, atol=0)
    assert plain(lps[1], group, 1).item() > got.item()  # without the cap: 2 * 10 dominates

    # Positive advantages are untouched by the dual clip.
    assert torch.equal(dual(lps[0], group, 0), plain(lps[0], group, 0))
    assert torch.equal(grad(dual(lps[0], group, 0), lps[0]), grad(plain(lps[0], group, 0), lps[0]))


def test_kl_is_zero_with_zero_gradient_when_ref_equals_logprobs():
    group, lps = make_group([3, 2], seed=2, ref=False)
    same = dataclasses.replace(
        group, data={**group.data, "ref_logprobs": [x.detach() for x in lps]}
    )
    with_kl, without = PolicyLoss(kl_coef=0.7), PolicyLoss()
    for i in range(2):
        a, b = with_kl(lps[i], same, i), without(lps[i], same, i)
        assert torch.equal(a, b)
        assert torch.equal(grad(a, lps[i]), grad(b, lps[i]))


def test_kl_term_value_and_gradient():
    group, lps = make_group([4, 2], seed=3)
    with_kl, without = PolicyLoss(kl_coef=0.7), PolicyLoss()
    for i in range(2):
        d = group.data["ref_logprobs"][i] - lps[i].detach()
        w = 0.7 / 6
        diff = with_kl(lps[i], group, i) - without(lps[i], group, i)
        torch.testing.assert_close(diff, w * (d.exp() - d - 1).sum(), rtol=1e-13, atol=0)
        assert diff.item() > 0
        torch.testing.assert_close(grad(diff, lps[i]), w * (1 - d.exp()), rtol=1e-13, atol=0)


def test_kl_off_never_reads_ref_logprobs():
    group, lps = make_group([2, 3], ref=False)
    assert PolicyLoss(kl_coef=0.0)(lps[1], group, 1).requires_grad


def test_custom_keys():
    group, lps = make_group([2, 3], seed=4)
    renamed = dataclasses.replace(
        group,
        data={
            "A": group.data["advantages"],
            "behaviour": group.data["old_logprobs"],
            "reference": group.data["ref_logprobs"],
        },
    )
    custom = PolicyLoss(
        kl_coef=0.5, advantages_key="A", old_logprobs_key="behaviour", ref_logprobs_key="reference"
    )
    default = PolicyLoss(kl_coef=0.5)
    assert torch.equal(custom(lps[1], renamed, 1), default(lps[1], group, 1))


def test_float32_logprobs_with_float64_data():
    group, lps = make_group([3, 2], seed=5)
    lp32 = lps[0].detach().float().requires_grad_()
    loss = PolicyLoss(kl_coef=0.2, dual_clip=2.0)
    got = loss(lp32, group, 0)
    assert got.dtype == torch.float32 and grad(got, lp32).dtype == torch.float32
    torch.testing.assert_close(got.double(), loss(lps[0], group, 0), rtol=1e-5, atol=1e-6)


def test_config_is_frozen_and_high_defaults_to_low():
    loss = PolicyLoss(clip_eps_low=0.3)
    assert loss.clip_eps_high == 0.3
    with pytest.raises(dataclasses.FrozenInstanceError):
        loss.kl_coef = 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"clip_eps_low": -0.1}, "clip_eps_low must be a finite number >= 0, got -0.1"),
        ({"clip_eps_low": math.nan}, "clip_eps_low must be a finite number >= 0, got nan"),
        ({"clip_eps_low": True}, "clip_eps_low must be a finite number >= 0, got True"),
        ({"clip_eps_high": -1}, "clip_eps_high must be a finite number >= 0, got -1"),
        ({"clip_eps_high": math.inf}, "clip_eps_high must be a finite number >= 0, got inf"),
        ({"kl_coef": -0.5}, "kl_coef must be a finite number >= 0, got -0.5"),
        ({"kl_coef": "0.1"}, "kl_coef must be a finite number >= 0, got '0.1'"),
        ({"dual_clip": 1.0}, "dual_clip must be None or a finite number > 1, got 1.0"),
        ({"dual_clip": 0.5}, "dual_clip must be None or a finite number > 1, got 0.5"),
        ({"dual_clip": math.inf}, "dual_clip must be None or a finite number > 1, got inf"),
        ({"scale": 0}, "scale must be a finite number > 0, got 0"),
        ({"scale": -1.0}, "scale must be a finite number > 0, got -1.0"),
        (
            {"aggregation": "mean"},
            "aggregation must be one of ('token-mean', 'sequence-mean', 'token-sum'), got 'mean'",
        ),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PolicyLoss(**kwargs)


def with_data(group, **changes):
    data = {**group.data, **changes}
    return dataclasses.replace(group, data={k: v for k, v in data.items() if v is not None})


@pytest.mark.parametrize(
    "change, loss, error, message",
    [
        (
            {"advantages": None},
            PolicyLoss(),
            KeyError,
            "group.data must hold 'advantages', got keys ['old_logprobs', 'ref_logprobs']",
        ),
        (
            {"ref_logprobs": None},
            PolicyLoss(kl_coef=0.1),
            KeyError,
            "group.data must hold 'ref_logprobs', got keys ['advantages', 'old_logprobs']",
        ),
        (
            {"advantages": torch.zeros(3)},
            PolicyLoss(),
            ValueError,
            "advantages given as a tensor must have shape [G=2] (one per response), got (3,)",
        ),
        (
            {"advantages": torch.zeros(2, 3)},
            PolicyLoss(),
            ValueError,
            "advantages given as a tensor must have shape [G=2] (one per response), got (2, 3)",
        ),
        (
            {"advantages": [torch.zeros(3)]},
            PolicyLoss(),
            ValueError,
            "advantages must hold one entry per response (G=2), got 1",
        ),
        (
            {"advantages": [torch.zeros(3), torch.zeros(2)]},
            PolicyLoss(),
            ValueError,
            "advantages[1] must have shape [3] like response 1, got (2,)",
        ),
        (
            {"advantages": [0.5, 1.0]},
            PolicyLoss(),
            TypeError,
            "advantages[1] must be a tensor [3], got float",
        ),
        (
            {"old_logprobs": [torch.zeros(2), torch.zeros(1, 3)]},
            PolicyLoss(),
            ValueError,
            "old_logprobs[1] must have shape [3] like response 1, got (1, 3)",
        ),
        (
            {"old_logprobs": -1.0},
            PolicyLoss(),
            TypeError,
            "old_logprobs must be a sequence of G=2 tensors, got float",
        ),
        (
            {"old_logprobs": torch.tensor(-1.0)},
            PolicyLoss(),
            TypeError,
            "old_logprobs must be a sequence of G=2 tensors, got Tensor",
        ),
        (
            {"ref_logprobs": [torch.zeros(2), torch.zeros(4)]},
            PolicyLoss(kl_coef=0.1),
            ValueError,
            "ref_logprobs[1] must have shape [3] like response 1, got (4,)",
        ),
    ],
)
def test_data_errors(change, loss, error, message):
    group, lps = make_group([2, 3])
    with pytest.raises(error, match=re.escape(message)):
        loss(lps[1], with_data(group, **change), 1)


@pytest.mark.parametrize(
    "logprobs, error, message",
    [
        (
            torch.zeros(3, dtype=F64),
            ValueError,
            "logprobs must have shape [2] like response 0, got (3,)",
        ),
        (torch.zeros(1, 2), ValueError, "logprobs must have shape [2] like response 0, got (1, 2)"),
        (
            torch.zeros(2, dtype=torch.long),
            TypeError,
            "logprobs must be a floating-point tensor, got torch.int64",
        ),
        ([0.0, 0.0], TypeError, "logprobs must be a floating-point tensor, got list"),
    ],
)
def test_logprobs_errors(logprobs, error, message):
    group, _ = make_group([2, 3])
    with pytest.raises(error, match=re.escape(message)):
        PolicyLoss()(logprobs, group, 0)


@given(rewards=st.lists(st.floats(-10, 10), min_size=2, max_size=16), eps=st.floats(1e-8, 1e-2))
def test_group_advantages_match_hand_formula(rewards, eps):
    got = group_advantages(torch.tensor(rewards, dtype=F64), eps=eps)
    mean, std = statistics.fmean(rewards), statistics.stdev(rewards)
    want = torch.tensor([(r - mean) / (std + eps) for r in rewards], dtype=F64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    centred = group_advantages(torch.tensor(rewards, dtype=F64), std_normalise=False)
    torch.testing.assert_close(centred, torch.tensor(rewards, dtype=F64) - mean, rtol=0, atol=1e-12)


def test_group_advantages_edge_cases():
    assert torch.equal(group_advantages(torch.full((4,), 0.5)), torch.zeros(4))
    assert torch.equal(group_advantages(torch.tensor([3.0])), torch.zeros(1))
    ints = group_advantages(torch.tensor([1, 0, 0, 1]))
    assert ints.dtype == torch.get_default_dtype()
    want = torch.tensor([0.5, -0.5, -0.5, 0.5]) / ((1 / 3) ** 0.5 + 1e-6)  # unbiased std
    torch.testing.assert_close(ints, want)


@pytest.mark.parametrize(
    "rewards, kwargs, message",
    [
        (torch.zeros(2, 2), {}, "rewards must be a non-empty 1-D tensor [G], got (2, 2)"),
        (torch.zeros(0), {}, "rewards must be a non-empty 1-D tensor [G], got (0,)"),
        ([1.0, 2.0], {}, "rewards must be a non-empty 1-D tensor [G], got list"),
        (torch.zeros(2), {"eps": -1e-6}, "eps must be a finite number >= 0, got -1e-06"),
    ],
)
def test_group_advantages_errors(rewards, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        group_advantages(rewards, **kwargs)


def test_end_to_end_dense_and_reuse_schedules_agree():
    torch.manual_seed(0)
    cfg = hbmplan.models.DecoderConfig(
        vocab_size=61,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=48,
        max_positions=256,
    )
    model = hbmplan.models.ReferenceDecoder(cfg).double()
    gen = torch.Generator().manual_seed(0)
    groups = []
    for P, lens in [(9, [3, 1, 5, 2]), (4, [6, 2])]:
        n = len(lens)
        groups.append(
            hbmplan.Group(
                prompt=torch.randint(0, 61, (P,), generator=gen),
                responses=[torch.randint(0, 61, (s,), generator=gen) for s in lens],
                data={
                    "advantages": group_advantages(torch.rand(n, generator=gen, dtype=F64)),
                    # The untrained model gives log-probs near -log(61); spread old ones by 0.3
                    # so that some ratios fall outside the clip range.
                    "old_logprobs": [
                        -math.log(61) + 0.3 * torch.randn(s, generator=gen, dtype=F64) for s in lens
                    ],
                    "ref_logprobs": [
                        -math.log(61) + 0.1 * torch.randn(s, generator=gen, dtype=F64) for s in lens
                    ],
                },
            )
        )
    loss = PolicyLoss(dual_clip=3.0, kl_coef=0.1, scale=1 / len(groups))

    def grads():
        out = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        return out

    # Direct: the loss summed over every trajectory of the plain model, and the ratios it saw.
    ratios = []
    total = 0
    for group in groups:
        P = group.prompt_len
        for i, r in enumerate(group.responses):
            ids = torch.cat([group.prompt, r[:-1]])[None]
            hidden, _ = model(ids, torch.arange(ids.shape[1])[None])
            logp = model.lm_head(hidden[0, P - 1 :]).log_softmax(-1)
            lp = logp.gather(-1, r[:, None]).squeeze(-1)
            ratios.append((lp.detach() - group.data["old_logprobs"][i]).exp())
            total = total + loss(lp, group, i)
    total.backward()
    direct = grads()
    ratios = torch.cat(ratios)
    assert ((ratios < 0.8) | (ratios > 1.2)).any() and ((ratios > 0.8) & (ratios < 1.2)).any()
    assert direct.abs().max() > 0

    hbmplan.schedules.dense_step(model, groups, loss)
    dense = grads()
    with hbmplan.memory(model) as mem:
        mem.step(groups, loss)
    reuse = grads()

    scale = direct.abs().max()
    assert (dense - direct).abs().max() <= 1e-10 * scale
    assert (reuse - dense).abs().max() <= 1e-10 * scale
