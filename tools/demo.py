"""`make demo`: the reuse schedule against the dense trainer on an embedded default model.

Prints the maximum relative gradient difference, both step times (median and spread of
interleaved repetitions), the speedup next to the FLOP-ideal speedup, and memory per phase; a
loud warning when the timing is noisy or implausible. CPU: a small fp32 reference decoder (about
half a minute on 2 cores), as many torch threads as CPUs this process may use (``--threads``).
CUDA: four layers at half the Llama3-8B width in bf16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hbmplan
from hbmplan.capacity import model_spec
from hbmplan.capacity.flops import dense_flops, flop_ideal_speedup, reuse_flops
from hbmplan.models import DecoderConfig, ReferenceDecoder
from hbmplan.schedules import dense_step
from tools.harness import (
    add_threads_arg,
    apply_threads,
    card_name,
    check_timings,
    machine_line,
    time_interleaved,
)

DEFAULTS = {
    "cpu": dict(hidden=256, layers=4, heads=8, kv_heads=2, ffn=704, vocab=8192,
                prompt=1024, response=64, group=8, dtype="float32"),
    "cuda": dict(hidden=2048, layers=4, heads=16, kv_heads=4, ffn=7168, vocab=32000,
                 prompt=8192, response=512, group=8, dtype="bfloat16"),
}  # fmt: skip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for key in DEFAULTS["cpu"]:
        p.add_argument(f"--{key.replace('_', '-')}", type=None if key == "dtype" else int)
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repetitions of each step, dense and reuse interleaved")  # fmt: skip
    add_threads_arg(p)
    p.add_argument("--tokens-per-microbatch", type=int, default=None,
                   help="tokens per microbatch, both schedules (default on CPU: 160, about three "
                        "responses per phase-B microbatch, since one short response alone makes "
                        "GEMMs too small to run at the dense rate; on CUDA: one response each)")  # fmt: skip
    p.add_argument("--attention", default="auto", choices=("auto", "triton", "reference", "padded"),
                   help="phase-B attention (auto: the Triton kernel on CUDA)")  # fmt: skip
    args = p.parse_args()
    defaults = DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    apply_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                        num_heads=args.heads, num_kv_heads=args.kv_heads,
                        intermediate_size=args.ffn, max_positions=args.prompt + args.response)  # fmt: skip
    model = ReferenceDecoder(cfg).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    lens = [max(1, args.response - 7 * i) for i in range(args.group)]  # varied lengths
    group = hbmplan.Group(
        prompt=torch.randint(0, args.vocab, (args.prompt,), generator=gen).to(device),
        responses=[torch.randint(0, args.vocab, (s,), generator=gen).to(device) for s in lens],
        data={"advantages": torch.randn(args.group, generator=gen).to(device)},
    )
    loss_fn = hbmplan.losses.PolicyLoss(aggregation="token-mean")
    tpm = args.tokens_per_microbatch
    if tpm is None and not args.device.startswith("cuda"):
        tpm = 160

    dense_stats = []

    def dense():
        dense_stats[:] = [dense_step(model, [group], loss_fn, tpm)]

    mem = hbmplan.memory(model, tokens_per_microbatch=tpm, attention=args.attention)

    def reuse():
        with mem:
            mem.step([group], loss_fn)

    def grads(fn):
        model.zero_grad(set_to_none=True)
        fn()
        return [p.grad.float().clone() for p in model.parameters()]

    g_dense, g_reuse = grads(dense), grads(reuse)
    rel = max(
        ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(g_reuse, g_dense, strict=True)
    )
    timings = time_interleaved({"dense": dense, "reuse": reuse}, device, args.repeats)
    shape = model_spec(model)
    flops = {"dense": dense_flops(shape, args.prompt, lens),  # what each step executes
             "reuse": reuse_flops(shape, args.prompt, lens, executed=True)}  # fmt: skip
    ideal = flop_ideal_speedup(shape, args.prompt, lens)

    mib = 2**20
    print(f"hbmplan demo on {card_name(device)}, {args.dtype}: reference decoder h={args.hidden} "
          f"L={args.layers}, P={args.prompt}, G={args.group}, S={min(lens)}..{max(lens)}")  # fmt: skip
    print(machine_line())
    print(f"max relative gradient difference, reuse vs dense: {rel:.2e}")
    for name, t in timings.items():
        peak = f"   peak {t.peak / mib:8.1f} MiB" if t.peak else ""
        rate = flops[name] / t.median / 1e9
        print(f"{name} step  {t.describe()}, {rate:.1f} GFLOP/s{peak}")
    td, tr = timings["dense"], timings["reuse"]
    per_run = [a / b for a, b in zip(td.times, tr.times, strict=True)]
    print(f"speedup {td.median / tr.median:.2f}x (median; per repetition {min(per_run):.2f}-"
          f"{max(per_run):.2f}x), FLOP-ideal {ideal:.2f}x")  # fmt: skip
    check_timings(timings, device, flops)
    d = dense_stats[0]
    print(f"dense trainer: peak {d.peak_bytes / mib:.1f} MiB ({d.memory_source})")
    print(mem.report())


if __name__ == "__main__":
    main()
