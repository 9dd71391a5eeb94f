"""Tensor- and context-parallel benchmark: bytes communicated per phase and step time.

Spawns one world per degree (gloo on CPU, nccl with one GPU per rank on CUDA) and runs the reuse
step with TP (DTensor, hbmplan's plan) or CP (the prompt split; pass-Q and K/V all-gather) at
degrees 1 and 2. Bytes are measured where they are sent, next to the formula for them:

* TP: payload bytes of every all-reduce the plan issues (a dispatch mode sees each functional
  collective, backward included), per phase. Formula per layer, tokens t, width h: forward 2
  all-reduces of t·h (o_proj, down_proj), backward 5 (the inputs of q, k, v, gate, up); phase A
  runs forward only, phase C backward only through the layers its K/V depend on.
* CP: bytes received per phase (``hbmplan.memory(...).cp_bytes``) against
  :func:`hbmplan.distributed.cp_attention.exchange_elements`.

Step times are medians of ``--repeats`` steps after one warm-up, per world (ratios between
degrees are what CPU numbers are good for). Writes benchmarks/results/parallel_<card>_<date>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.cpus import usable_cpus
from tools.harness import machine_line, markdown_table, write_results


def _model(args, device, dtype):
    from hbmplan.models import DecoderConfig, ReferenceDecoder

    torch.manual_seed(0)
    cfg = DecoderConfig(
        vocab_size=4096, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, intermediate_size=4 * args.hidden, max_positions=1 << 16,
    )  # fmt: skip
    return ReferenceDecoder(cfg).to(device=device, dtype=dtype)


def _group(args, device):
    import hbmplan

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 4096, (args.prompt,), generator=g)
    lens = [args.response] * args.group
    responses = [torch.randint(0, 4096, (s,), generator=g) for s in lens]
    return hbmplan.Group(prompt.to(device), [r.to(device) for r in responses],
                         data={"advantages": torch.randn(args.group, generator=g).to(device)})  # fmt: skip


def _loss(logprobs, group, i):
    return -(group.data["advantages"][i] * logprobs).mean()


class _AllReduceBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Payload bytes of functional all-reduces, by the phase a participant last named."""

    def __init__(self):
        super().__init__()
        self.phase, self.bytes = "A", {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "_c10d_functional" and func.__name__.startswith("all_reduce"):
            self.bytes[self.phase] = self.bytes.get(self.phase, 0) + args[0].nbytes
        return func(*args, **(kwargs or {}))


def _phase_marker(counter):
    from hbmplan.runtime import Participant

    class Marker(Participant):
        def before_a(self, ctx):
            counter.phase = "A"

        def after_a(self, ctx):
            counter.phase = "B"

        def before_c(self, ctx):
            counter.phase = "C"

    return Marker()


def _rank(rank, world, init, args, mode, exchange, out):
    device = torch.device(f"cuda:{rank}") if args.device == "cuda" else torch.device("cpu")
    torch.set_num_threads(max(1, usable_cpus() // world))  # the usable CPUs, shared fairly
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))  # fmt: skip
    try:
        import hbmplan
        from hbmplan.distributed.cp_attention import exchange_elements
        from hbmplan.distributed.tensor_parallel import parallelize

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model, group = _model(args, device, dtype), _group(args, device)
        mesh = dist.device_mesh.init_device_mesh(device.type, (world,))
        it, h, L = dtype.itemsize, args.hidden, args.layers
        n, T = args.prompt - 1, args.response
        row = {"mode": mode, "degree": world, "exchange": exchange if mode == "cp" else "-"}
        times = []
        if mode == "tp":
            if world > 1:
                parallelize(model, mesh)
            counter = _AllReduceBytes()
            for i in range(args.repeats + 2):  # warm-up, timed steps, one counted step
                counting = i == args.repeats + 1
                marker = [_phase_marker(counter)] if counting else []
                t0 = time.perf_counter()
                count = counter if counting else contextlib.nullcontext()
                mem = hbmplan.memory(model, participants=marker, tokens_per_microbatch=args.tokens,
                                     attention=args.attention)  # fmt: skip
                with count, mem:
                    mem.step([group], _loss)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if not counting:
                    times.append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
            measured = counter.bytes
            mbs = -(-args.group * T // args.tokens) if args.tokens else args.group
            tokens_b = args.group * T
            formula = {"A": 2 * L * n * h * it, "B": 7 * L * tokens_b * h * it,
                       "C": (5 * (L - 1) + 2) * n * h * it} if world > 1 else {}  # fmt: skip
            row["microbatches"] = mbs
        else:
            cfg = {"cp_mesh": mesh, "cp_exchange": exchange, "tokens_per_microbatch": args.tokens}
            with hbmplan.memory(model, **cfg) as mem:
                for i in range(args.repeats + 1):
                    t0 = time.perf_counter()
                    mem.step([group], _loss)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    model.zero_grad(set_to_none=True)
                    if i == 0:
                        first = dict(mem.cp_bytes)
            measured = {k: v - first.get(k, 0) for k, v in mem.cp_bytes.items()}
            measured = {k: v // args.repeats for k, v in measured.items()}
            acc = 4 if it < 4 else it
            shape = dict(heads=args.heads, kv_heads=args.kv_heads,
                         head_dim=args.hidden // args.heads, slice_len=-(-n // world))  # fmt: skip
            per_mb = args.tokens // T * T if args.tokens else T
            microbatches = -(-args.group * T // per_mb)
            rounds = -(-microbatches // world)
            b_it = acc if exchange == "pass-q" else it
            formula = {
                "A": L * it * exchange_elements("prompt-a", world, **shape),
                "B": rounds * L * b_it * exchange_elements(exchange, world, tokens=per_mb, **shape),
                "C": (L - 1) * it * exchange_elements("prompt-c", world, **shape),
            } if world > 1 else {}  # fmt: skip
        row["step_s"] = statistics.median(times[1:])
        row["measured"], row["formula"] = measured, formula
        if rank == 0:
            out.put(row)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt", type=int, default=1025)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=None, help="tokens per phase-B microbatch")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attention", default="reference",
                    help="TP rows' phase-B attention (CP runs packed rows: 'reference' compares "
                         "like with like on CPU; 'auto' on GPUs)")  # fmt: skip
    ap.add_argument("--degrees", default="1,2")
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/")
    args = ap.parse_args()
    print(machine_line(), flush=True)
    ctx = mp.get_context("spawn")
    rows = []
    cases = [("tp", "-")] + [("cp", e) for e in ("pass-q", "all-gather")]
    for mode, exchange in cases:
        for world in (int(d) for d in args.degrees.split(",")):
            if mode == "cp" and world == 1 and exchange == "all-gather":
                continue
            q = ctx.Queue()
            with tempfile.TemporaryDirectory() as tmp:
                init = os.path.join(tmp, "rendezvous")
                mp.start_processes(_rank, args=(world, init, args, mode, exchange, q),
                                   nprocs=world, start_method="spawn")  # fmt: skip
            row = q.get()
            rows.append(row)
            print(row, flush=True)
    base = {r["mode"]: r["step_s"] for r in rows if r["degree"] == 1}
    table_rows = []
    for r in rows:
        for ph in ("A", "B", "C"):
            m, f = r["measured"].get(ph, 0), r["formula"].get(ph, 0)
            table_rows.append([
                r["mode"], r["degree"], r["exchange"], ph, m, f,
                f"{m / f:.3f}" if f else "-", f"{r['step_s']:.3f}",
                f"{r['step_s'] / base[r['mode']]:.2f}" if r["mode"] in base else "-",
            ])  # fmt: skip
    table = markdown_table(
        ["mode", "degree", "exchange", "phase", "bytes measured", "bytes formula",
         "measured/formula", "step s (median)", "vs degree 1"], table_rows,
    )  # fmt: skip
    shape = (f"P={args.prompt}, S={args.response}, G={args.group}, h={args.hidden}, "
             f"L={args.layers}, heads {args.heads}/{args.kv_heads}")  # fmt: skip
    print(shape)
    print(table)
    if args.write:
        path = write_results("parallel", torch.device(args.device),
                             "python tools/bench_parallel.py " + " ".join(sys.argv[1:]),
                             f"{machine_line()}\n\n{shape}\n\n{table}", rows)  # fmt: skip
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
