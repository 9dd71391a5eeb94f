"""Cases run inside one gloo world per (engine, world size), for test_data_parallel.py. Each case
returns plain data (floats, strings, bools) that the test asserts on; a case that raises fails
its whole world, named by rank."""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
import torch.distributed as dist

import hbmplan
from hbmplan.errors import RankFailureError
from hbmplan.losses import PolicyLoss
from hbmplan.runtime import Participant
from tests.helpers import VOCAB, max_rel_diff, pg_loss, random_group, tiny_hf, tiny_reference

warnings.filterwarnings("ignore", message=".*returned a view tensor.*")

# Unequal work per rank: group counts, prompt lengths and microbatch counts all differ.
SHAPES = [
    [(9, [3, 5, 2]), (14, [1, 4])],
    [(12, [4, 1, 6, 2, 3])],
    [(7, [2, 2]), (10, [5]), (6, [3, 1, 1])],
    [(16, [6, 2, 4])],
]


def groups_of(rank: int, step: int = 0) -> list[hbmplan.Group]:
    """Rank ``rank``'s groups at step ``step`` (seeded: every rank can build every rank's)."""
    return [
        random_group(p, lens, seed=1000 * step + 10 * rank + i)
        for i, (p, lens) in enumerate(SHAPES[rank % len(SHAPES)])
    ]


def union(world: int, step: int = 0) -> list[hbmplan.Group]:
    return [g for r in range(world) for g in groups_of(r, step)]


def make_model(kind: str) -> torch.nn.Module:
    return tiny_reference() if kind == "reference" else tiny_hf(kind)


def layers_of(model: torch.nn.Module):
    return model.layers if hasattr(model, "layers") else model.model.layers


def wrap(model: torch.nn.Module, engine: str, mesh_shape: tuple[int, ...]):
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = ("replicate", "shard") if len(mesh_shape) == 2 else ("shard",)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    for layer in layers_of(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: full(p.grad).detach().clone() for n, p in model.named_parameters() if p.grad is not None
    }


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: full(p.detach()).clone() for n, p in model.named_parameters()}


def dense_grads(base, world: int, steps=(0,)) -> dict[str, torch.Tensor]:
    """Single-process dense training's gradients on the union of every rank's groups of
    ``steps``, divided by the world size."""
    ref = copy.deepcopy(base)
    for s in steps:
        hbmplan.schedules.dense_step(ref, union(world, s), pg_loss)
    return {n: p.grad / world for n, p in ref.named_parameters() if p.grad is not None}


def exact(rank, world, engine, kind="reference", grad_sync="phase-c", mesh=None, **kw) -> float:
    """One reuse step per rank on its own groups: max relative difference from dense."""
    base = make_model(kind)
    want = dense_grads(base, world)
    model = copy.deepcopy(base)
    wrapped = wrap(model, engine, mesh or (world,))
    with hbmplan.memory(wrapped, tokens_per_microbatch=8, grad_sync=grad_sync, **kw) as mem:
        mem.step(groups_of(rank), pg_loss)
    assert mem.report().last.data_parallel is not None
    return max_rel_diff(grads(model), want)


def offload_bitwise(rank, world, engine) -> bool:
    """FSDP2 with every dormant prompt tensor offloaded equals FSDP2 without, bit for bit."""
    base = make_model("reference")
    out = []
    for offload in ("off", "all"):
        model = copy.deepcopy(base)
        wrapped = wrap(model, engine, (world,))
        with hbmplan.memory(wrapped, offload=offload, tokens_per_microbatch=8) as mem:
            mem.step(groups_of(rank), pg_loss)
        out.append(grads(model))
    return all(torch.equal(out[0][n], out[1][n]) for n in out[0])


def accumulate(rank, world, engine, grad_sync="phase-c") -> dict:
    """``sync=False`` then ``sync=True``: the first reduces nothing (no sharded/DDP gradient
    is averaged yet), the second reduces the total once."""
    base = make_model("reference")
    want = dense_grads(base, world, steps=(0, 1))
    model = copy.deepcopy(base)
    wrapped = wrap(model, engine, (world,))
    with hbmplan.memory(wrapped, tokens_per_microbatch=8, grad_sync=grad_sync) as mem:
        mem.step(groups_of(rank, 0), pg_loss, sync=False)
        after_first = grads(model)
        mem.step(groups_of(rank, 1), pg_loss, sync=True)
    if engine == "fsdp2":  # nothing reduce-scattered into the sharded gradients yet
        first = "none" if not after_first else "some"
    else:  # DDP: this rank's own gradients, not averaged
        ref = copy.deepcopy(base)
        hbmplan.schedules.dense_step(ref, groups_of(rank, 0), pg_loss)
        own = {n: p.grad for n, p in ref.named_parameters()}
        first = f"local {max_rel_diff(after_first, own):.1e}"
    return {"diff": max_rel_diff(grads(model), want), "first": first}


class FailIn(Participant):
    """Raises in phase ``phase`` on rank ``rank`` (phase "B": before a microbatch's backward)."""

    def __init__(self, phase: str, rank: int) -> None:
        self.phase, self.rank, self.armed = phase, rank, False

    def before_backward(self, ctx) -> None:
        if self.armed and self.phase == "B" and dist.get_rank() == self.rank:
            raise ValueError("injected in phase B")

    def before_c(self, ctx) -> None:
        if self.armed and self.phase == "C" and dist.get_rank() == self.rank:
            raise RuntimeError("injected in phase C")


def atomic(rank, world, engine, phase: str, grad_sync="phase-c") -> dict:
    """Step 0 succeeds; step 1 fails on rank 1 (``phase`` "B", "C", or "early": rank 1's
    groups fail validation before the step begins); every rank raises, gradients equal step 0's
    bit for bit; step 2 succeeds and gradients equal steps 0 and 2."""
    base = make_model("reference")
    want = dense_grads(base, world, steps=(0, 2))
    model = copy.deepcopy(base)
    wrapped = wrap(model, engine, (world,))
    fail = FailIn(phase, 1)
    with hbmplan.memory(
        wrapped, tokens_per_microbatch=8, grad_sync=grad_sync, participants=[fail]
    ) as mem:
        mem.step(groups_of(rank, 0), pg_loss)
        before = grads(model)
        fail.armed = True
        groups = groups_of(rank, 1)
        if phase == "early" and rank == 1:
            bad = groups[0]
            groups[0] = hbmplan.Group(
                bad.prompt, [bad.responses[0] * 0 + VOCAB + 3, *bad.responses[1:]], bad.data
            )
        raised = ""
        try:
            mem.step(groups, pg_loss)
        except RankFailureError as exc:
            raised = f"RankFailureError {exc.ranks}"
        except Exception as exc:
            notes = " ".join(getattr(exc, "__notes__", []))
            raised = f"{type(exc).__name__} note={'rank(s) [1]' in notes}"
        restored = grads(model)
        fail.armed = False
        mem.step(groups_of(rank, 2), pg_loss)
    same = before.keys() == restored.keys() and all(
        torch.equal(before[n], restored[n]) for n in before
    )
    return {"raised": raised, "restored": same, "next": max_rel_diff(grads(model), want)}


def optimizer(rank, world, engine, steps=3) -> float:
    """Several steps with AdamW: parameters equal single-process dense training's."""
    base = make_model("reference")
    ref = copy.deepcopy(base)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for s in range(steps):
        hbmplan.schedules.dense_step(ref, union(world, s), pg_loss)
        for p in ref.parameters():
            p.grad /= world
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
    model = copy.deepcopy(base)
    wrapped = wrap(model, engine, (world,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with hbmplan.memory(wrapped, tokens_per_microbatch=8) as mem:
        for s in range(steps):
            mem.step(groups_of(rank, s), pg_loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
    want = params(ref)
    return max_rel_diff(params(model), want)


def refusals(rank, world) -> list[str]:
    """Typed errors before any collective."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    out = []
    try:
        hbmplan.memory(DistributedDataParallel(tiny_reference()), grad_sync="every-microbatch")
    except Exception as exc:
        out.append(type(exc).__name__)
    model = tiny_reference()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model.layers[0], mesh=mesh)  # no root
    try:
        hbmplan.memory(model)
    except Exception as exc:
        out.append(type(exc).__name__)
    model = tiny_reference()
    fully_shard([model.norm, model.lm_head], mesh=mesh)  # grouped unit
    fully_shard(model, mesh=mesh)
    try:
        hbmplan.memory(model)
    except Exception as exc:
        out.append(type(exc).__name__)
    return out


def empty_rank(rank, world, engine, grad_sync="phase-c") -> float:
    """Rank 1 has no group (``mem.step([])``): it joins the collectives with no work."""
    base = make_model("reference")
    ref = copy.deepcopy(base)
    hbmplan.schedules.dense_step(ref, groups_of(0), pg_loss)
    want = {n: p.grad / world for n, p in ref.named_parameters()}
    model = copy.deepcopy(base)
    wrapped = wrap(model, engine, (world,))
    with hbmplan.memory(wrapped, tokens_per_microbatch=8, grad_sync=grad_sync) as mem:
        mem.step(groups_of(0) if rank == 0 else [], pg_loss)
    return max_rel_diff(grads(model), want)


def skipping(rank, world, engine, grad_sync="phase-c") -> dict:
    """Exact skipping under data parallel: rank 0 has one inert response, every response of rank
    1's groups is inert (its plan has no group left after skipping); ranks still join the same
    collectives, and the gradients equal dense training without skipping."""

    def tied(r: int) -> list[hbmplan.Group]:
        out = []
        for i, g in enumerate(groups_of(r)):
            adv = g.data["advantages"].clone()
            adv[:] = 0.0 if r == 1 else adv
            if r == 0 and i == 0:
                adv[1] = 0.0
            out.append(hbmplan.Group(g.prompt, g.responses, data={"advantages": adv}))
        return out

    loss = PolicyLoss()
    base = make_model("reference")
    ref = copy.deepcopy(base)
    everyone = [g for r in range(world) for g in tied(r)]
    hbmplan.schedules.dense_step(ref, everyone, loss, skip_inert=False)
    want = {n: p.grad / world for n, p in ref.named_parameters() if p.grad is not None}
    model = copy.deepcopy(base)
    wrapped = wrap(model, engine, (world,))
    with hbmplan.memory(wrapped, tokens_per_microbatch=8, grad_sync=grad_sync) as mem:
        stats = mem.step(tied(rank), loss)
    return {"diff": max_rel_diff(grads(model), want), "skipped": stats.skipped.responses}


def mixed_precision(rank, world) -> str:
    """FSDP2 with MixedPrecisionPolicy(bf16 params, fp32 reduce) on an fp32 model, by the
    tolerance rule against fp64 dense (bf16 dense as the baseline's error); "" when it holds."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from tests.helpers import assert_tolerance_rule

    base = tiny_reference(dtype=torch.float32)
    want = dense_grads(base.double(), world)
    dense = dense_grads(copy.deepcopy(base).to(torch.bfloat16), world)
    model = copy.deepcopy(base).float()
    mesh = init_device_mesh("cpu", (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    with hbmplan.memory(model, tokens_per_microbatch=8) as mem:
        mem.step(groups_of(rank), pg_loss)
    try:
        assert_tolerance_rule(grads(model), dense, want)
    except AssertionError as exc:
        return str(exc)
    return ""


def readme(rank, world) -> str:
    """The README's "Many GPUs" example, as written, inside this world."""
    import contextlib
    import io
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (block,) = [
        b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "fully_shard(" in b
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
    return out.getvalue()


def dense_dp(rank, world, engine, kind="reference", grad_sync="phase-c") -> float:
    """hbmplan.distributed.dense_step on each rank's own groups (unequal microbatch counts)."""
    from hbmplan.distributed import dense_step

    base = make_model(kind)
    want = dense_grads(base, world)
    model = copy.deepcopy(base)
    wrapped = wrap(model, engine, (world,))
    stats = dense_step(wrapped, groups_of(rank), pg_loss, 40, grad_sync=grad_sync)
    assert stats.data_parallel is not None
    return max_rel_diff(grads(model), want)


def moe_global_batch(rank, world, empty_rank: int | None = None) -> dict:
    """A mixture-of-experts model with the global-batch router loss: the counts are summed over
    ranks, so reuse (mem.step) and dense (distributed.dense_step) equal single-process dense on
    the union with the global-batch loss; a rank without groups still joins the counting."""
    from hbmplan.distributed import dense_step
    from tests.helpers.moe import tiny_moe

    def mine(r):
        return [] if r == empty_rank else groups_of(r)

    base = tiny_moe()
    ref = copy.deepcopy(base)
    everything = [g for r in range(world) for g in mine(r)]
    hbmplan.schedules.dense_step(ref, everything, pg_loss, router_loss="global-batch")
    want = {n: p.grad / world for n, p in ref.named_parameters() if p.grad is not None}
    out = {}
    for how in ("reuse", "dense"):
        model = copy.deepcopy(base)
        wrapped = wrap(model, "fsdp2", (world,))
        if how == "reuse":
            with hbmplan.memory(wrapped, tokens_per_microbatch=8, router_loss="global-batch") as m:
                m.step(mine(rank), pg_loss)
        else:
            dense_step(wrapped, mine(rank), pg_loss, 40, router_loss="global-batch")
        got = grads(model)
        out[how] = max_rel_diff({n: got[n] for n in want}, want)
    return out


def moe_fails_before_counting(rank, world) -> str:
    """Global-batch router loss, rank 1's groups fail validation (before the counting pass): it
    still joins the counts' sum, every rank raises, none hangs."""
    from tests.helpers.moe import tiny_moe

    model = tiny_moe()
    wrapped = wrap(model, "fsdp2", (world,))
    groups = groups_of(rank)
    if rank == 1:
        bad = groups[0]
        groups[0] = hbmplan.Group(bad.prompt * 0 + VOCAB + 1, bad.responses, bad.data)
    with hbmplan.memory(wrapped, tokens_per_microbatch=8, router_loss="global-batch") as mem:
        try:
            mem.step(groups, pg_loss)
        except RankFailureError as exc:
            return f"RankFailureError {exc.ranks}"
        except ValueError:
            return "ValueError"
    return "no error"


def recompute_bitwise(rank, world) -> dict:
    """FSDP2 with a budget the planner meets by recomputing layers in phase C (a slow link):
    gradients bit for bit those without offload; layers were replayed."""
    from hbmplan.planner import Rates

    base = tiny_reference(torch.float32, layers=3)
    steps = [[random_group(P, [5, 9], seed=P + rank, dtype=torch.float32)] for P in (30, 40, 40)]

    def run(**kw):
        model = copy.deepcopy(base)
        wrapped = wrap(model, "fsdp2", (world,))
        with hbmplan.memory(wrapped, **kw) as mem:
            stats = [mem.step(groups, pg_loss) for groups in steps]
        return grads(model), stats

    plain, plain_stats = run(offload="off")
    budget = int(0.85 * max(p.peak_bytes for p in plain_stats[1].phases.values()))
    got, stats = run(hbm_budget=budget, rates=Rates(d2h_gbps=1e-4, h2d_gbps=1e-4))
    return {
        "bitwise": all(torch.equal(plain[n], got[n]) for n in plain),
        "recomputed": stats[2].offload.plan.recompute_bytes > 0,
    }


def plain_fsdp_after(rank, world, reshard_after_forward: bool) -> float:
    """After hbmplan steps (and a failed one), the model trains with FSDP2's own hooks as before:
    a plain forward and backward reduces as FSDP2 does (settings and state put back)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    base = make_model("reference")
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(rank))

    def plain_loss(m, x):
        hidden, _ = m(x, torch.arange(x.shape[1])[None])
        return m.lm_head(hidden).double().square().mean()

    ref = copy.deepcopy(base)
    for r in range(world):
        x = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(r))
        (plain_loss(ref, x) / world).backward()
    want = {n: p.grad for n, p in ref.named_parameters()}
    model = copy.deepcopy(base)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh)  # the root's default: kept gathered after forward (lm_head)
    fail = FailIn("B", 1)
    with hbmplan.memory(model, tokens_per_microbatch=8, participants=[fail]) as mem:
        mem.step(groups_of(rank), pg_loss)
        fail.armed = True
        with contextlib.suppress(Exception):
            mem.step(groups_of(rank), pg_loss)
    model.zero_grad(set_to_none=True)
    plain_loss(model, ids).backward()
    return max_rel_diff(grads(model), want)


def token_count(rank, world) -> int:
    from hbmplan.distributed import global_token_count

    return global_token_count(groups_of(rank))


def fsdp_world(rank: int, world: int) -> dict:
    return {
        "empty-rank": empty_rank(rank, world, "fsdp2", grad_sync="every-microbatch"),
        "skipping": skipping(rank, world, "fsdp2", grad_sync="every-microbatch"),
        "tokens": token_count(rank, world),
        "bf16-mixed": mixed_precision(rank, world),
        "moe-global": moe_global_batch(rank, world),
        "moe-global/empty-rank": moe_global_batch(rank, world, empty_rank=1),
        "moe-global/early": moe_fails_before_counting(rank, world),
        "dense": dense_dp(rank, world, "fsdp2", kind="Qwen3"),
        "dense/every-microbatch": dense_dp(rank, world, "fsdp2", grad_sync="every-microbatch"),
        "readme": readme(rank, world),
        "reference": exact(rank, world, "fsdp2"),
        "reference/every-microbatch": exact(rank, world, "fsdp2", grad_sync="every-microbatch"),
        "qwen3": exact(rank, world, "fsdp2", kind="Qwen3"),
        "llama/every-microbatch": exact(
            rank, world, "fsdp2", kind="Llama", grad_sync="every-microbatch"
        ),
        "accumulate": accumulate(rank, world, "fsdp2"),
        "accumulate/every-microbatch": accumulate(
            rank, world, "fsdp2", grad_sync="every-microbatch"
        ),
        "atomic/B": atomic(rank, world, "fsdp2", "B"),
        "atomic/C": atomic(rank, world, "fsdp2", "C", grad_sync="every-microbatch"),
        "atomic/early": atomic(rank, world, "fsdp2", "early"),
        "optimizer": optimizer(rank, world, "fsdp2"),
        "offload": offload_bitwise(rank, world, "fsdp2"),
        "recompute": recompute_bitwise(rank, world),
        "plain-after": plain_fsdp_after(rank, world, True),
        "plain-after/no-reshard": plain_fsdp_after(rank, world, False),
        "refusals": refusals(rank, world),
    }


def ddp_world(rank: int, world: int) -> dict:
    return {
        "empty-rank": empty_rank(rank, world, "ddp"),
        "skipping": skipping(rank, world, "ddp"),
        "dense": dense_dp(rank, world, "ddp"),
        "reference": exact(rank, world, "ddp"),
        "qwen3": exact(rank, world, "ddp", kind="Qwen3"),
        "accumulate": accumulate(rank, world, "ddp"),
        "atomic/B": atomic(rank, world, "ddp", "B"),
        "atomic/C": atomic(rank, world, "ddp", "C"),
        "atomic/early": atomic(rank, world, "ddp", "early"),
        "optimizer": optimizer(rank, world, "ddp"),
    }


def hsdp_world(rank: int, world: int) -> dict:
    return {
        "hsdp": exact(rank, world, "fsdp2", mesh=(2, world // 2), grad_sync="every-microbatch"),
    }
