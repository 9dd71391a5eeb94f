"""Data-parallel benchmark: bytes all-gathered and reduced per step, gradient bytes held, peak
activation bytes and step time, reuse vs dense on the same groups, under FSDP2 and DDP.

    torchrun --standalone --nproc-per-node 2 tools/bench_dist.py            # CPU, gloo
    torchrun --standalone --nproc-per-node 1 tools/bench_dist.py            # 1 GPU, nccl

Bytes are measured at the c10d calls (``all_gather_into_tensor``, ``reduce_scatter_tensor``,
``all_reduce``: the bytes of each call's unsharded tensor, on this rank), not computed. Dense
runs FSDP2's own hooks (each microbatch's forward and backward all-gather every unit; gradient
sync off, then one reduce-scatter per unit at the end, as a trainer accumulating over
microbatches does); reuse runs through ``hbmplan.memory``. Peak activation bytes are the
schedules' held-tensor counts on CPU (``StepStats``), the CUDA allocator's on GPU. Gradient
bytes held: the most unsharded + sharded gradient bytes present at a backward boundary (within
one backward, "every-microbatch" and FSDP2's own sync also hold one unit's unsharded gradients).
Times: median of ``--repeats`` after one warm-up, slowest rank.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hbmplan
from hbmplan.models import DecoderConfig, ReferenceDecoder
from hbmplan.runtime import Participant

GATHERS = ("all_gather_single", "all_gather_into_tensor")
REDUCTIONS = ("reduce_scatter_single", "reduce_scatter_tensor", "all_reduce")
COUNTED = tuple(n for n in (*GATHERS, *REDUCTIONS) if hasattr(dist, n))


class Wire:
    """Counts calls and bytes of the c10d collectives FSDP2, DDP and hbmplan use."""

    def __init__(self) -> None:
        self.calls = dict.fromkeys(COUNTED, 0)
        self.bytes = dict.fromkeys(COUNTED, 0)
        self.on = False

    @contextlib.contextmanager
    def patched(self):
        saved = {name: getattr(dist, name) for name in COUNTED}

        def counting(name):
            fn = saved[name]

            def call(*args, **kwargs):
                if self.on:
                    given = [*args[:2], *kwargs.values()]
                    tensors = [a for a in given if isinstance(a, torch.Tensor)]
                    self.calls[name] += 1
                    self.bytes[name] += max(t.numel() * t.element_size() for t in tensors)
                return fn(*args, **kwargs)

            return call

        for name in COUNTED:
            setattr(dist, name, counting(name))
        try:
            yield self
        finally:
            for name, fn in saved.items():
                setattr(dist, name, fn)

    def reset(self) -> None:
        self.calls = dict.fromkeys(COUNTED, 0)
        self.bytes = dict.fromkeys(COUNTED, 0)


def grad_bytes(model: torch.nn.Module) -> int:
    """Unsharded (inside FSDP2) and sharded gradient bytes present now."""
    tensors = {}
    seen = set()
    for m in model.modules():
        state = getattr(m, "_get_fsdp_state", None)
        if state is None:
            continue
        for g in state()._fsdp_param_groups:
            if id(g) in seen:
                continue
            seen.add(id(g))
            for p in g.fsdp_params:
                u = getattr(p, "_unsharded_param", None)
                sharded = p.sharded_param.grad
                sharded = sharded.to_local() if sharded is not None else None
                for t in (u.grad if u is not None else None, p.unsharded_accumulated_grad, sharded):
                    if t is not None:
                        tensors[(t.data_ptr(), t.numel())] = t
    for p in model.parameters():  # while unsharded, these are the tensors above: counted once
        if p.grad is not None:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            tensors[(g.data_ptr(), g.numel())] = g
    return sum(t.numel() * t.element_size() for t in tensors.values())


class GradMeter(Participant):
    """The most gradient bytes present at a phase boundary."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.peak = model, 0

    def _sample(self, *_):
        self.peak = max(self.peak, grad_bytes(self.model))

    before_backward = after_microbatch = before_c = after_c = _sample


def make_groups(rank: int, step: int, args, vocab: int, device) -> list[hbmplan.Group]:
    g = torch.Generator().manual_seed(7919 * step + rank)
    out = []
    for _ in range(args.groups):
        prompt = torch.randint(0, vocab, (args.prompt,), generator=g)
        lens = torch.randint(args.min_response, args.max_response + 1, (args.G,), generator=g)
        responses = [torch.randint(0, vocab, (int(s),), generator=g).to(device) for s in lens]
        out.append(hbmplan.Group(prompt.to(device), responses,
                                 data={"advantages": torch.randn(args.G, generator=g).to(device)}))  # fmt: skip
    return out


def loss_fn(logprobs, group, i):
    return -(group.data["advantages"][i].to(logprobs.dtype) * logprobs).mean()


def shard(model, device):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def dense_fsdp_step(model, groups, tpm, meter):
    """A trainer's step under FSDP2: sync off through the microbatches, one reduce at the end."""
    model.set_requires_gradient_sync(False)
    stats = hbmplan.schedules.dense_step(model, groups, loss_fn, tokens_per_microbatch=tpm)
    meter.peak = max(meter.peak, grad_bytes(model))  # the unsharded gradients, before the reduce
    model.set_requires_gradient_sync(True)
    model.set_is_last_backward(True)
    state = model._get_fsdp_state()
    for s in state._state_ctx.all_states:
        for g in s._fsdp_param_groups:
            g.reduce_scatter_unused_params = True
            g.post_backward()
    state._root_post_backward_final_callback()
    for s in state._state_ctx.all_states:
        for g in s._fsdp_param_groups:
            g.reshard()
    return stats


def dense_ddp_step(ddp, groups, tpm, meter):
    """DDP's own accumulation: ``no_sync`` for all groups but the last... DDP cannot sync a
    dense_step whose forward is the wrapped module's; hbmplan's reducer does it instead."""
    from hbmplan.distributed.data_parallel import DDPSync

    stats = hbmplan.schedules.dense_step(ddp.module, groups, loss_fn, tokens_per_microbatch=tpm)
    DDPSync(ddp).after_merge(True)
    return stats


def peak(stats) -> int:
    return max((p.peak_bytes for p in stats.phases.values()), default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--groups", type=int, default=2, help="groups per rank")
    ap.add_argument("--min-response", type=int, default=16)
    ap.add_argument("--max-response", type=int, default=64)
    ap.add_argument(
        "--tokens-per-microbatch",
        type=int,
        default=None,
        help="default: one trajectory per microbatch, so every rank runs as many "
        "dense microbatches (FSDP2's per-forward all-gathers must match)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default="", help="write the markdown table here too")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", rank % max(torch.cuda.device_count(), 1))
        if cuda
        else torch.device("cpu")
    )
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=4096, hidden_size=args.hidden, num_layers=args.layers,
                        num_heads=8, num_kv_heads=2, intermediate_size=4 * args.hidden,
                        max_positions=args.prompt + args.max_response + 8)  # fmt: skip
    dtype = torch.bfloat16 if cuda else torch.float32
    base = ReferenceDecoder(cfg).to(device=device, dtype=dtype)
    tpm = args.tokens_per_microbatch
    wire = Wire()
    variants = ["dense fsdp2", "reuse fsdp2 phase-c", "reuse fsdp2 every-microbatch",
                "dense ddp", "reuse ddp"]  # fmt: skip
    rows = []
    with wire.patched():
        for name in variants:
            model = copy.deepcopy(base)
            engine = "ddp" if name.endswith("ddp") else "fsdp2"
            if engine == "ddp":
                from torch.nn.parallel import DistributedDataParallel

                wrapped = DistributedDataParallel(model, device_ids=[device] if cuda else None)
            else:
                wrapped = shard(model, device)
            meter = GradMeter(model)
            sync = name.split()[-1] if "reuse fsdp2" in name else "phase-c"
            ctx = (
                hbmplan.memory(
                    wrapped, tokens_per_microbatch=tpm, grad_sync=sync, participants=[meter]
                )
                if name.startswith("reuse")
                else contextlib.nullcontext()
            )
            times, peaks, per_step = [], [], None
            with ctx as mem:
                for step in range(args.repeats + 1):
                    groups = make_groups(rank, step, args, cfg.vocab_size, device)
                    wire.reset()
                    wire.on = True
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    dist.barrier()
                    wire.on = True
                    t0 = time.perf_counter()
                    if mem is not None:
                        stats = mem.step(groups, loss_fn)
                    elif engine == "ddp":
                        stats = dense_ddp_step(wrapped, groups, tpm, meter)
                    else:
                        stats = dense_fsdp_step(wrapped, groups, tpm, meter)
                    if cuda:
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - t0
                    wire.on = False
                    if mem is None:
                        meter.peak = max(meter.peak, grad_bytes(model))
                    model.zero_grad(set_to_none=True)
                    if step == 0:
                        continue  # warm-up
                    slowest = torch.tensor([seconds], device=device)
                    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                    times.append(slowest.item())
                    peaks.append(torch.cuda.max_memory_allocated() if cuda else peak(stats))
                    per_step = (dict(wire.calls), dict(wire.bytes))
            calls, nbytes = per_step
            mib = 2**20

            def total(names, d):
                return sum(d.get(n, 0) for n in names)

            rows.append([
                name,
                f"{total(GATHERS, calls)} / {total(GATHERS, nbytes) / mib:.1f}",
                f"{total(REDUCTIONS, calls)} / {total(REDUCTIONS, nbytes) / mib:.1f}",
                f"{meter.peak / mib:.1f}",
                f"{max(peaks) / mib:.1f}",
                f"{statistics.median(times) * 1e3:.0f} ({min(times) * 1e3:.0f}-{max(times) * 1e3:.0f})",
            ])  # fmt: skip
            del wrapped, model
    if rank == 0:
        head = ["variant", "all-gathers: calls / MiB", "reductions: calls / MiB",
                "gradient MiB held between backwards (peak)", "peak MiB (activations)" if not cuda else "peak MiB (allocator)",
                "step ms median (range)"]  # fmt: skip
        params = sum(p.numel() for p in base.parameters())
        lines = [
            f"bench_dist: {world} rank(s), {'nccl' if cuda else 'gloo CPU'}, reference decoder "
            f"h={args.hidden} L={args.layers} ({params / 1e6:.1f}M params, {dtype}), P={args.prompt}, "
            f"G={args.G}, responses {args.min_response}-{args.max_response}, {args.groups} group(s) "
            f"per rank, tokens_per_microbatch={tpm}; rank 0's "
            f"bytes per step (measured at the c10d calls), slowest rank's time, "
            f"{args.repeats} repeats after a warm-up",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in rows),
        ]
        text = "\n".join(lines)
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
