"""Rank-side cases of the tensor- and context-parallel tests: each world (one per world size)
runs every case and returns plain numbers; the test modules assert on them.

Reference: the same groups through single-process ``dense_step`` on an unparallelised copy of
the model, fp64. Gradients are compared after one step (gathered: ``full_tensor`` under TP; CP
ranks hold the CP-summed gradient), parameters after several AdamW steps.
"""

from __future__ import annotations

import copy
import traceback

import torch
import torch.distributed as dist

import hbmplan
from hbmplan.schedules import dense_step, reuse_step
from tests.helpers import grads_of, max_rel_diff, pg_loss, random_group, tiny_hf, tiny_reference


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _grads(model, fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    fn()
    out = {
        n: _full(p.grad).detach().clone() for n, p in model.named_parameters() if p.grad is not None
    }
    model.zero_grad(set_to_none=True)
    return out


def _dense(model, groups) -> dict[str, torch.Tensor]:
    return grads_of(model, lambda: dense_step(model, groups, pg_loss))


def _raises(fn) -> str:
    """The class and message of what ``fn()`` raised ("" if nothing)."""
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def _adamw_steps(model, step, steps=3) -> dict[str, torch.Tensor]:
    """Parameters after ``steps`` AdamW steps, each on the gradient ``step(i)`` leaves."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    for i in range(steps):
        step(i)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: _full(p).detach().clone() for n, p in model.named_parameters()}


def _param_diff(a, b) -> float:
    return max((a[n] - b[n]).abs().max().item() / max(b[n].abs().max().item(), 1e-12) for n in b)


# -- tensor parallel -------------------------------------------------------------------------
def tp_world(rank: int, world_size: int, ckpt_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from hbmplan.distributed.tensor_parallel import parallelize, tensor_parallel_plan

    mesh = init_device_mesh("cpu", (world_size,))
    out: dict = {}
    groups = [random_group(9, [3, 1, 5], seed=1), random_group(6, [2, 4], seed=2)]

    def compare(name, model, reference, attentions=("reference",), **kw):
        dense = _dense(reference, groups)
        for attention in attentions:
            got = _grads(
                model, lambda a=attention: reuse_step(model, groups, pg_loss, attention=a, **kw)
            )
            out[f"{name}/{attention}"] = max_rel_diff(got, dense)

    # reference decoder, hbmplan's plan
    model = tiny_reference()
    reference = copy.deepcopy(model)
    parallelize(model, mesh)
    compare("reference", model, reference, ("padded", "reference"), tokens_per_microbatch=6)
    out["reference/local_kv_heads"] = model.layers[0].attn.k_proj.weight.to_local().shape[0] // 8

    def mem_step(m):
        def step(i):
            with hbmplan.memory(m, tokens_per_microbatch=6) as mem:
                mem.step([random_group(7, [2, 3], seed=10 + i)], pg_loss)

        return step

    def dense_steps(i):
        dense_step(reference, [random_group(7, [2, 3], seed=10 + i)], pg_loss)

    reference = copy.deepcopy(tiny_reference())
    model = parallelize(tiny_reference(), mesh)
    out["reference/adamw3"] = _param_diff(
        _adamw_steps(model, mem_step(model)), _adamw_steps(reference, dense_steps)
    )
    out["reference/offload"] = _raises(
        lambda: reuse_step(model, groups, pg_loss, config=hbmplan.ReuseConfig(offload="all"))
    )

    # K/V heads not divisible by the degree: refused by parallelize and by the step
    out["kv_heads/parallelize"] = _raises(lambda: parallelize(tiny_reference(kv_heads=1), mesh))
    odd = tiny_reference(kv_heads=1)
    parallelize_module(odd, mesh, tensor_parallel_plan(odd))
    out["kv_heads/step"] = _raises(lambda: reuse_step(odd, groups, pg_loss))

    # Hugging Face Llama: hbmplan's plan, and Hugging Face's own tp_plan
    for family in ("Llama", "Qwen3"):
        model = tiny_hf(family)
        reference = copy.deepcopy(model)
        parallelize(model, mesh)
        compare(f"{family}/plan", model, reference)

    from transformers import DistributedConfig, LlamaForCausalLM, Qwen3ForCausalLM

    for family, cls in (("Llama", LlamaForCausalLM), ("Qwen3", Qwen3ForCausalLM)):
        model = tiny_hf(family)
        path = f"{ckpt_dir}/{family}"
        if rank == 0:
            model.save_pretrained(path)
        dist.barrier()
        loaded = cls.from_pretrained(
            path, distributed_config=DistributedConfig(tp_size=world_size), dtype=torch.float64
        )
        loaded.train()
        out[f"{family}/hf_tp_plan/sharded"] = type(
            loaded.model.layers[0].self_attn.k_proj.weight
        ).__name__
        if family == "Llama":
            compare("Llama/hf_tp_plan", loaded, model)
        else:
            out["Qwen3/hf_tp_plan/refused"] = _raises(
                lambda m=loaded: reuse_step(m, groups, pg_loss)
            )

    # Qwen3 with a projections-only plan: q_norm/k_norm left replicated, refused
    model = tiny_hf("Qwen3")
    plan = {k: v for k, v in tensor_parallel_plan(model).items() if "norm" not in k}
    parallelize_module(model, mesh, plan)
    out["Qwen3/projections_only"] = _raises(lambda: reuse_step(model, groups, pg_loss))
    # ... whose dense gradient is wrong too (the trap is the plan's, not hbmplan's)
    reference = tiny_hf("Qwen3")
    got = _grads(model, lambda: dense_step(model, groups, pg_loss))
    want = _dense(reference, groups)
    out["Qwen3/projections_only/dense_q_norm"] = max(
        (got[n] - want[n]).abs().max().item() / want[n].abs().max().item()
        for n in want
        if "q_norm" in n
    )
    return out


# -- context parallel ------------------------------------------------------------------------
def cp_world(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from hbmplan.distributed.cp_attention import exchange_elements

    mesh = init_device_mesh("cpu", (world_size,))
    out: dict = {}

    def run(name, model, groups, tokens=None, **kw):
        reference = copy.deepcopy(model)
        try:
            with hbmplan.memory(model, tokens_per_microbatch=tokens, cp_mesh=mesh, **kw) as mem:
                got = _grads(model, lambda: mem.step(groups, pg_loss))
            out[name] = max_rel_diff(got, _dense(reference, groups))
            return mem
        except Exception:
            out[name] = traceback.format_exc()
            return None

    cases = {
        "P9": [random_group(9, [3, 1, 5], seed=1)],
        "P10_two_groups": [random_group(10, [2, 6, 1], seed=2), random_group(5, [4], seed=3)],
        "P2_G1": [random_group(2, [4], seed=4)],
        "P3_G1": [random_group(3, [1], seed=5)],
    }
    for case, groups in cases.items():
        for exchange in ("pass-q", "all-gather"):
            for balance in ("zigzag", "contiguous"):
                for tokens in (None, 6) if case.startswith(("P9", "P10")) else (None,):
                    name = f"reference/{case}/{exchange}/{balance}/{tokens}"
                    run(
                        name,
                        tiny_reference(),
                        groups,
                        tokens,
                        cp_exchange=exchange,
                        cp_balance=balance,
                    )
    for family in ("Llama", "Qwen3"):
        for case in ("P10_two_groups", "P2_G1"):
            run(f"{family}/{case}", tiny_hf(family), cases[case], 6)

    # several optimizer steps
    model, reference = tiny_reference(), tiny_reference()

    def cp_steps(i):
        with hbmplan.memory(model, tokens_per_microbatch=6, cp_mesh=mesh) as mem:
            mem.step([random_group(8, [2, 3, 4], seed=20 + i)], pg_loss)

    def dense_steps(i):
        dense_step(reference, [random_group(8, [2, 3, 4], seed=20 + i)], pg_loss)

    out["reference/adamw3"] = _param_diff(
        _adamw_steps(model, cp_steps), _adamw_steps(reference, dense_steps)
    )

    # per-rank held bytes of the prompt's activations: CP=2 against this same code on one rank
    solo = [dist.new_group([r]) for r in range(world_size)][rank]
    P, layers = 257, 2
    group = [random_group(P, [3, 2], seed=6)]
    model = tiny_reference(layers=layers)
    peaks = {}
    for name, g in (("cp", mesh), ("single", solo)):
        with hbmplan.memory(model, cp_mesh=g) as mem:
            stats = mem.step(group, pg_loss)
        peaks[name] = stats.phases["A"].peak_bytes
        model.zero_grad(set_to_none=True)
    with hbmplan.memory(model) as mem:  # the ordinary single-process step, for the note
        peaks["reuse"] = mem.step(group, pg_loss).phases["A"].peak_bytes
    n, kv_heads, dim = P - 1, 2, 8
    from hbmplan.capacity.presets import model_spec
    from hbmplan.capacity.step_bytes import estimate_step

    estimate = estimate_step(
        model_spec(model), P, [3, 2], "reuse", torch.float64, target="cpu", cp=world_size
    )
    out["bytes"] = {**peaks, "layer_kv": 2 * n * kv_heads * dim * 8, "world": world_size,
                    "estimate": estimate["A"].total}  # fmt: skip

    # bytes received per phase against the documented formula (elements x itemsize)
    model = tiny_reference()
    groups = [random_group(11, [3, 1, 5, 2], seed=7)]  # n = 10: slices of 5
    shape = dict(heads=4, kv_heads=2, head_dim=8, slice_len=5)
    for exchange in ("pass-q", "all-gather"):
        with hbmplan.memory(model, cp_mesh=mesh, cp_exchange=exchange) as mem:
            mem.step(groups, pg_loss)
        model.zero_grad(set_to_none=True)
        rounds = [5, 2]  # tokens 3, 1, 5, 2, longest first: rounds (5, 3) and (2, 1)
        b = sum(exchange_elements(exchange, world_size, tokens=t, **shape) for t in rounds)
        out[f"comm/{exchange}"] = {
            "measured": mem.cp_bytes,
            "formula": {
                "A": layers * 8 * exchange_elements("prompt-a", world_size, **shape),
                "B": layers * 8 * b,
                "C": (layers - 1) * 8 * exchange_elements("prompt-c", world_size, **shape),
            },
        }
    # the errors: mixture-of-experts, a config with cp_mesh through reuse_step
    from tests.helpers.moe import tiny_moe

    out["moe"] = _raises(lambda: hbmplan.memory(tiny_moe(), cp_mesh=mesh).__enter__().step(
        [random_group(5, [2], seed=1)], pg_loss))  # fmt: skip
    out["reuse_step"] = _raises(
        lambda: reuse_step(
            tiny_reference(), cases["P9"], pg_loss, config=hbmplan.ReuseConfig(cp_mesh=mesh)
        )
    )
    return out


# -- a 2 x 2 mesh: context parallel over tensor-parallel ranks --------------------------------
def mesh_world(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from hbmplan.distributed.tensor_parallel import parallelize

    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("cp", "tp"))
    groups = [random_group(10, [2, 6, 1], seed=2), random_group(2, [4], seed=3)]
    out: dict = {}
    model = tiny_reference()
    reference = copy.deepcopy(model)
    parallelize(model, mesh["tp"])
    dense = _dense(reference, groups)
    for exchange in ("pass-q", "all-gather"):
        cfg = dict(cp_mesh=mesh["cp"], cp_exchange=exchange, tokens_per_microbatch=6)
        with hbmplan.memory(model, **cfg) as mem:
            got = _grads(model, lambda m=mem: m.step(groups, pg_loss))
        out[exchange] = max_rel_diff(got, dense)
    return out


def _dp_groups(dp: int) -> list:
    """Data-parallel rank ``dp``'s groups: unequal counts, lengths and microbatches."""
    return [
        [random_group(10, [2, 6, 1], seed=2)],
        [random_group(7, [4], seed=3), random_group(5, [3, 2], seed=4)],
    ][dp]


def _fsdp_over(model, dp_mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model


def dp_mesh_world(rank: int, world_size: int) -> dict:
    """FSDP2 on the data-parallel dimension of a 2 x 2 mesh, over TP (``parallelize``) and over
    CP (``cp_mesh``): every rank's gradients equal dense on the union of both DP ranks' groups,
    divided by the DP degree."""
    from torch.distributed.device_mesh import init_device_mesh

    from hbmplan.distributed.tensor_parallel import parallelize

    base = tiny_reference()
    reference = copy.deepcopy(base)
    dense = _dense(reference, _dp_groups(0) + _dp_groups(1))
    want = {n: g / 2 for n, g in dense.items()}
    out: dict = {}

    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp"))
    model = copy.deepcopy(base)
    parallelize(model, mesh["tp"])
    _fsdp_over(model, mesh["dp"])
    mine = _dp_groups(mesh["dp"].get_local_rank())
    for grad_sync in ("phase-c", "every-microbatch"):
        with hbmplan.memory(model, tokens_per_microbatch=6, grad_sync=grad_sync) as mem:
            got = _grads(model, lambda m=mem: m.step(mine, pg_loss))
        out[f"dp-tp/{grad_sync}"] = max_rel_diff(got, want)

    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "cp"))
    model = _fsdp_over(copy.deepcopy(base), mesh["dp"])
    mine = _dp_groups(mesh["dp"].get_local_rank())
    for exchange in ("pass-q", "all-gather"):
        cfg = dict(cp_mesh=mesh["cp"], cp_exchange=exchange, tokens_per_microbatch=6)
        with hbmplan.memory(model, **cfg) as mem:
            got = _grads(model, lambda m=mem: m.step(mine, pg_loss))
        out[f"dp-cp/{exchange}"] = max_rel_diff(got, want)
    out["dp-cp/every-microbatch"] = _raises(
        lambda: hbmplan.memory(model, cp_mesh=mesh["cp"], grad_sync="every-microbatch")
    )
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(copy.deepcopy(base))
    out["dp-cp/ddp"] = _raises(lambda: hbmplan.memory(ddp, cp_mesh=mesh["cp"]))
    return out
