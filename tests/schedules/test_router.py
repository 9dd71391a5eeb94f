"""Router losses under the reuse schedule: the dense trainer's loss and gradients, with the prompt
dispatched once per step and counted G times (logical prefix-token accounting)."""

from __future__ import annotations

import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hbmplan
from hbmplan.runtime.planning import PromptPlanner
from hbmplan.schedules import dense_step, reuse_step
from hbmplan.schedules import phases as phases_mod
from hbmplan.schedules import reuse as reuse_mod
from hbmplan.schedules import router as router_mod
from tests.helpers import grads_of, pg_loss, random_group, tiny_hf, tiny_reference
from tests.helpers.moe import aux_by_definition, grad_diff, tiny_hf_moe, tiny_moe

MODES = ["per-trajectory", "global-batch"]


def run_both(model, groups, loss=pg_loss, mode="per-trajectory", tpm_dense=None, tpm_reuse=None):
    """(dense grads, dense stats, reuse grads, reuse stats); reuse through hbmplan.memory."""
    box = {}
    dense = grads_of(
        model,
        lambda: box.setdefault("d", dense_step(model, groups, loss, tpm_dense, router_loss=mode)),
    )

    def run():
        with hbmplan.memory(model, tokens_per_microbatch=tpm_reuse, router_loss=mode) as mem:
            box["r"] = mem.step(groups, loss)

    reuse = grads_of(model, run)
    return dense, box["d"], reuse, box["r"]


def assert_router_stats_equal(a, b, rtol):
    assert a.mode == b.mode
    assert torch.equal(a.expert_tokens, b.expert_tokens)
    torch.testing.assert_close(a.loss, b.loss, rtol=rtol, atol=0)
    torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=rtol, atol=0)
    assert (a.z_loss is None) == (b.z_loss is None)
    if a.z_loss is not None:
        torch.testing.assert_close(a.z_loss, b.z_loss, rtol=rtol, atol=0)


def prompt_and_row_counts(model, group):
    """Per-expert counts [L, E] of the prompt p[:-1] and of each trajectory, from plain forwards
    of the model (one per trajectory), independent of the schedules."""
    spec = model.cfg.router_spec()
    P = group.prompt_len

    def counts(ids):
        _, _, logits = model(ids[None], torch.arange(ids.numel())[None])
        return router_mod.routing_sums(spec, logits, [ids.numel()]).counts[0]

    with torch.no_grad():
        prompt = counts(group.prompt[:-1])
        trajectories = [counts(torch.cat([group.prompt, r[:-1]])) for r in group.responses]
    return prompt, trajectories, P


# ---- equality with the dense trainer ---------------------------------------------------------


@given(
    prompt_len=st.integers(2, 20),
    response_lens=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    n_groups=st.integers(1, 2),
    experts=st.integers(1, 6),
    top_k=st.integers(1, 3),
    budget=st.one_of(st.none(), st.integers(1, 40)),
    dense_budget=st.one_of(st.none(), st.integers(1, 80)),
    mode=st.sampled_from(MODES),
    balance=st.sampled_from(["per-layer", "all-layers"]),
    norm=st.booleans(),
    z=st.sampled_from([0.0, 0.05]),
    seed=st.integers(0, 2**16),
)
def test_reference_moe_fp64_equal_to_dense(
    prompt_len, response_lens, n_groups, experts, top_k, budget, dense_budget, mode, balance,
    norm, z, seed,
):  # fmt: skip
    model = tiny_moe(seed=seed % 5, experts=experts, top_k=min(top_k, experts), aux=0.7, z=z,
                     load_balancing=balance, norm_topk_prob=norm)  # fmt: skip
    groups = [
        random_group(prompt_len + g, response_lens[g:] or response_lens, seed=seed + g)
        for g in range(n_groups)
    ]
    dense, ds, reuse, rs = run_both(model, groups, mode=mode, tpm_dense=dense_budget,
                                    tpm_reuse=budget)  # fmt: skip
    assert len(reuse) == len(list(model.parameters()))
    assert grad_diff(reuse, dense) <= 1e-12
    assert_router_stats_equal(rs.router, ds.router, rtol=1e-12)
    # both schedules accumulate the step total in float32, grouped by microbatch: O(1) terms
    torch.testing.assert_close(rs.loss, ds.loss, rtol=0, atol=1e-4)


@settings(max_examples=6)
@given(
    prompt_len=st.integers(2, 14),
    response_lens=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    experts=st.integers(2, 6),
    top_k=st.integers(1, 3),
    norm=st.booleans(),
    budget=st.one_of(st.none(), st.integers(1, 30)),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
)
def test_hf_qwen3_moe_fp64_equal_to_dense(
    prompt_len, response_lens, experts, top_k, norm, budget, mode, seed
):
    model = tiny_hf_moe("Qwen3Moe", seed=seed % 3, coef=2.0, num_experts=experts,
                        num_experts_per_tok=min(top_k, experts), norm_topk_prob=norm)  # fmt: skip
    groups = [random_group(prompt_len, response_lens, seed=seed)]
    dense, ds, reuse, rs = run_both(model, groups, mode=mode, tpm_dense=budget, tpm_reuse=budget)
    assert grad_diff(reuse, dense) <= 1e-6
    assert_router_stats_equal(rs.router, ds.router, rtol=1e-6)


@pytest.mark.parametrize(
    "family, over",
    [("Mixtral", {}), ("Qwen2Moe", {}),
     ("Qwen3Moe", dict(num_hidden_layers=3, mlp_only_layers=[1]))],  # 2 router layers of 3
)  # fmt: skip
@pytest.mark.parametrize("mode", MODES)
def test_hf_other_moe_families_fp64_equal_to_dense(family, over, mode):
    model = tiny_hf_moe(family, coef=2.0, **over)
    groups = [random_group(12, [1, 5, 3, 6], seed=3), random_group(5, [2, 4], seed=4)]
    dense, ds, reuse, rs = run_both(model, groups, mode=mode, tpm_reuse=14)
    assert grad_diff(reuse, dense) <= 1e-6
    assert_router_stats_equal(rs.router, ds.router, rtol=1e-6)
    layers = model.config.num_hidden_layers - len(getattr(model.config, "mlp_only_layers", []))
    assert rs.router.expert_tokens.shape == (layers, model.num_experts)


def test_router_loss_values_by_definition():
    """Per trajectory: sum_i aux(trajectory i alone); global batch: aux over every trajectory's
    tokens concatenated, by the definition of the Switch loss."""
    model = tiny_moe(experts=5, top_k=2, aux=1.0)
    spec = model.cfg.router_spec()
    groups = [random_group(10, [1, 4, 6], seed=7), random_group(6, [3, 2], seed=8)]
    per_traj = []
    with torch.no_grad():
        for g in groups:
            for r in g.responses:
                ids = torch.cat([g.prompt, r[:-1]])
                per_traj.append(model(ids[None], torch.arange(ids.numel())[None])[2])
    want = {
        "per-trajectory": sum(aux_by_definition([lg[0] for lg in t], spec) for t in per_traj),
        "global-batch": aux_by_definition(
            [torch.cat([t[layer][0] for t in per_traj]) for layer in range(2)], spec
        ),
    }
    for mode in MODES:
        with hbmplan.memory(model, router_loss=mode) as mem:
            got = mem.step(groups, pg_loss).router
        torch.testing.assert_close(got.aux_loss, want[mode], rtol=1e-12, atol=0)
        torch.testing.assert_close(got.loss, want[mode], rtol=1e-12, atol=0)  # coef 1
    assert not torch.isclose(want["per-trajectory"], want["global-batch"], rtol=1e-3)


def test_z_loss_enters_gradients():
    groups = [random_group(9, [2, 5], seed=9)]
    with_z, without = tiny_moe(aux=0.1, z=0.5), tiny_moe(aux=0.1, z=0.0)
    dense, ds, reuse, rs = run_both(with_z, groups)
    assert grad_diff(reuse, dense) <= 1e-12
    assert_router_stats_equal(rs.router, ds.router, rtol=1e-12)
    assert rs.router.z_loss is not None and rs.router.z_loss > 0
    plain = grads_of(without, lambda: dense_step(without, groups, pg_loss))
    assert grad_diff(reuse, plain) > 1e-6


# ---- the prompt: dispatched once, counted G times --------------------------------------------


def test_prompt_dispatched_once_per_step():
    model = tiny_moe(experts=4, top_k=2, layers=3)
    P, lens = 17, [1, 4, 2, 6]
    groups = [random_group(P, lens, seed=1)]
    k, L = 2, 3
    before = model.dispatched
    dense_step(model, groups, pg_loss)  # one trajectory per microbatch: no padding
    dense = model.dispatched - before
    before = model.dispatched
    with hbmplan.memory(model) as mem:
        mem.step(groups, pg_loss)
    reuse = model.dispatched - before
    assert dense == k * L * sum(P + s - 1 for s in lens)  # the prompt G times
    assert reuse == k * L * ((P - 1) + sum(lens))  # the prompt once
    assert dense - reuse == k * L * (len(lens) - 1) * (P - 1)


@pytest.mark.parametrize("mode", MODES)
def test_hf_prompt_dispatched_once_per_step(mode):
    """Tokens entering the experts module of each MoE layer, counted with forward hooks."""
    model = tiny_hf_moe("Qwen3Moe")
    P, lens = 13, [2, 5, 1]
    seen = []
    hooks = [
        layer.mlp.experts.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
        for layer in model.model.layers
    ]
    try:
        groups = [random_group(P, lens, seed=2)]
        dense_step(model, groups, pg_loss, router_loss=mode)
        dense, seen[:] = sum(seen), []
        reuse_step(model, groups, pg_loss, router_loss=mode)
        reuse = sum(seen)
    finally:
        for h in hooks:
            h.remove()
    passes = 2 if mode == "global-batch" else 1  # the counting pass runs every forward again
    assert dense == passes * 2 * sum(P + s - 1 for s in lens)
    assert reuse == passes * 2 * ((P - 1) + sum(lens))


def test_reported_counts_weight_the_prompt_g_times():
    model = tiny_moe(experts=5, top_k=2)
    group = random_group(21, [3, 1, 4, 2], seed=5)
    prompt, trajectories, _ = prompt_and_row_counts(model, group)
    with hbmplan.memory(model, tokens_per_microbatch=9) as mem:
        stats = mem.step([group], pg_loss)
    got = stats.router.expert_tokens
    assert torch.equal(got, sum(trajectories))  # what the dense trainer sees
    G = group.group_size
    rows = sum(trajectories) - G * prompt  # every trajectory minus its prompt part
    assert torch.equal(got, G * prompt + rows)
    assert not torch.equal(got, prompt + rows)  # counted once would be this
    text = str(mem.report())
    assert "router loss (per-trajectory)" in text and "prompt x G + responses" in text
    assert " ".join(f"{c:>7d}" for c in got.sum(0).tolist()) in text


def test_prompt_counted_once_is_caught(monkeypatch):
    """A variant that adds the prompt's routing sums to the group's first microbatch only (the
    prompt counted once) must fail the equality test that the real schedule passes."""
    model = tiny_moe(experts=4, top_k=2, aux=5.0)
    groups = [random_group(15, [2, 3, 4], seed=6)]
    dense, ds, reuse, rs = run_both(model, groups)
    assert grad_diff(reuse, dense) <= 1e-12
    assert torch.equal(rs.router.expert_tokens, ds.router.expert_tokens)

    real = router_mod.with_prefix
    calls = {"n": 0}

    def once(prefix, rows):
        calls["n"] += 1
        if calls["n"] == 1:
            return real(prefix, rows)
        empty = router_mod.RoutingSums(
            prefix.counts * 0, prefix.prob_sums * 0, None, prefix.tokens
        )  # the tokens still count in T_i: only the prompt's counts and sums are dropped
        return real(empty, rows)

    monkeypatch.setattr(phases_mod, "with_prefix", once)
    _, _, wrong, ws = run_both(model, groups)
    assert calls["n"] == 3
    assert grad_diff(wrong, dense) > 1e-3
    assert not torch.equal(ws.router.expert_tokens, ds.router.expert_tokens)


def test_global_batch_prompt_counted_once_is_caught(monkeypatch):
    """The global-batch weights need the prompt's counts x G; with them once, gradients differ."""
    model = tiny_moe(experts=4, top_k=1, aux=5.0)
    group = random_group(19, [2, 3, 1, 4], seed=8)
    dense, _, reuse, _ = run_both(model, [group], mode="global-batch")
    assert grad_diff(reuse, dense) <= 1e-12
    prompt, _, P = prompt_and_row_counts(model, group)
    real = router_mod.count_reuse

    def prompt_once(*args):
        counts, tokens = real(*args)
        G = group.group_size
        return counts - (G - 1) * prompt, tokens - (G - 1) * (P - 1)

    monkeypatch.setattr(reuse_mod, "count_reuse", prompt_once)
    _, _, wrong, _ = run_both(model, [group], mode="global-batch")
    assert grad_diff(wrong, dense) > 1e-3


# ---- modes, other models, errors -------------------------------------------------------------


def test_modes_differ_and_off_is_no_router_loss():
    model = tiny_moe(aux=2.0, z=0.3)
    groups = [random_group(11, [2, 6, 3], seed=10)]
    grads = {m: run_both(model, groups, mode=m)[2] for m in [*MODES, "off"]}
    assert grad_diff(grads["global-batch"], grads["per-trajectory"]) > 1e-6
    assert grad_diff(grads["off"], grads["per-trajectory"]) > 1e-6
    zero = tiny_moe(aux=0.0, z=0.0)  # same weights, router loss off in the config
    assert hbmplan.models.adapt(zero).router is None
    with hbmplan.memory(zero) as mem:
        stats = mem.step(groups, pg_loss)
    assert stats.router is None
    plain = grads_of(zero, lambda: reuse_step(zero, groups, pg_loss))
    assert plain.keys() == grads["off"].keys()
    assert all(torch.equal(plain[k], grads["off"][k]) for k in plain)


@pytest.mark.parametrize("make", [tiny_reference, lambda: tiny_hf("Llama"),
                                  lambda: tiny_hf_moe("Qwen3Moe", on=False)],
                         ids=["reference", "llama", "qwen3-moe-off"])  # fmt: skip
def test_models_without_router_loss_unaffected(make):
    model = make()
    groups = [random_group(9, [3, 1, 4], seed=11)]
    default = grads_of(model, lambda: reuse_step(model, groups, pg_loss, 8))
    off = grads_of(model, lambda: reuse_step(model, groups, pg_loss, 8, router_loss="off"))
    assert default.keys() == off.keys() and all(torch.equal(default[k], off[k]) for k in off)
    assert reuse_step(model, groups, pg_loss).router is None
    assert dense_step(model, groups, pg_loss).router is None
    with hbmplan.memory(model) as mem:
        mem.step(groups, pg_loss)
    assert "router" not in str(mem.report())


@pytest.mark.parametrize("call", ["memory", "dense", "reuse"])
def test_bad_router_loss_options(call):
    groups = [random_group(5, [2], seed=12)]
    runs = {
        "memory": lambda m, mode: hbmplan.memory(m, router_loss=mode),
        "dense": lambda m, mode: dense_step(m, groups, pg_loss, router_loss=mode),
        "reuse": lambda m, mode: reuse_step(m, groups, pg_loss, router_loss=mode),
    }
    with pytest.raises(ValueError, match="router_loss must be 'per-trajectory', 'global-batch' "
                                         "or 'off', got 'sometimes'"):  # fmt: skip
        runs[call](tiny_moe(), "sometimes")
    with pytest.raises(ValueError, match="router_loss='global-batch' needs a model whose router "
                                         "loss is on"):  # fmt: skip
        runs[call](tiny_reference(), "global-batch")


# ---- offload and atomic steps ----------------------------------------------------------------


def test_offload_all_is_bitwise_same_and_router_sums_are_hot(monkeypatch):
    model = tiny_moe(torch.float32, aux=1.0, z=0.1)
    steps = [[random_group(20, [5, 9, 3], seed=13, dtype=torch.float32)]] * 2
    hot_lists = []
    real = PromptPlanner.after_a

    def spy(self, ctx):
        hot_lists.append({t.untyped_storage().data_ptr() for t in ctx.hot})
        return real(self, ctx)

    leaves = []
    real_init = router_mod.PrefixRouterLeaves.__init__

    def track(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        leaves.append({t.untyped_storage().data_ptr() for t in self.leaves})

    monkeypatch.setattr(PromptPlanner, "after_a", spy)
    monkeypatch.setattr(router_mod.PrefixRouterLeaves, "__init__", track)

    def run(offload):
        def fn():
            with hbmplan.memory(model, offload=offload, tokens_per_microbatch=16) as mem:
                box.append([mem.step(g, pg_loss) for g in steps])

        return grads_of(model, fn)

    box: list = []
    base = run("off")
    moved = run("all")
    assert base.keys() == moved.keys() and all(torch.equal(base[k], moved[k]) for k in base)
    assert all(s.offload.engine.bytes_offloaded > 0 for s in box[1])
    assert len(hot_lists) == 2 and len(leaves) == 4
    for hot, ptrs in zip(hot_lists, leaves[2:], strict=True):
        assert len(ptrs) == 2 and ptrs <= hot  # prob sums and z sums, both hot


def test_failed_step_restores_grads_and_releases_router_leaves(monkeypatch):
    model = tiny_moe(aux=1.0, z=0.2)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    snap = {n: p.grad.clone() for n, p in model.named_parameters()}
    refs: list[weakref.ref] = []
    real_init = router_mod.PrefixRouterLeaves.__init__

    def track(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        refs.extend(weakref.ref(t) for t in [*self.leaves, *self.grads])

    monkeypatch.setattr(router_mod.PrefixRouterLeaves, "__init__", track)
    calls = {"n": 0}

    def failing(lp, g, i):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("late")
        return pg_loss(lp, g, i)

    with pytest.raises(RuntimeError, match="late"), hbmplan.memory(model) as mem:
        mem.step([random_group(9, [2, 3, 4], seed=14)], failing)
    assert refs and not [r for r in refs if r() is not None]
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, snap[n]), n
