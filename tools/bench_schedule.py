"""Dense trainer vs reuse schedule over (P, S, G): median ms, peak memory, speedup, % of FLOP-ideal.

GPU: four Llama3-8B-shaped layers (h=4096, 32 heads, 8 KV heads, ffn 14336, vocab 32000), bf16,
the grid of docs/design.md. CPU: the same grid scaled down (h=256, P/16, S/16), fp32, as many
torch threads as CPUs this process may use (``--threads``). Dense and reuse run interleaved;
each cell reports the median and the spread of its repetitions, and a loud warning (also written
under the table) flags a noisy cell or achieved FLOP rates implausibly far apart.
Writes benchmarks/results/schedule_<card>_<yyyy-mm>.{md,json}; prints the table last.
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
    check_timings,
    machine_line,
    markdown_table,
    time_interleaved,
    write_results,
)

GRID = [(2048, 512, 4), (2048, 512, 8), (8192, 512, 8), (8192, 1024, 16), (16384, 1024, 16)]
GPU_MODEL = DecoderConfig(vocab_size=32000, hidden_size=4096, num_layers=4, num_heads=32,
                          num_kv_heads=8, intermediate_size=14336, max_positions=32768)  # fmt: skip
CPU_MODEL = DecoderConfig(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8,
                          num_kv_heads=2, intermediate_size=896, max_positions=32768)  # fmt: skip


def make_group(P: int, S: int, G: int, vocab: int, device: torch.device) -> hbmplan.Group:
    gen = torch.Generator().manual_seed(P + S + G)
    return hbmplan.Group(
        prompt=torch.randint(0, vocab, (P,), generator=gen).to(device),
        responses=[torch.randint(0, vocab, (S,), generator=gen).to(device) for _ in range(G)],
        data={"advantages": torch.randn(G, generator=gen).to(device)},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dense-tokens", type=int, default=None,
                    help="dense packing budget (default: one trajectory per microbatch)")  # fmt: skip
    ap.add_argument("--reuse-tokens", type=int, default=4096,
                    help="reuse response packing budget (packed: total tokens; padded: rows x "
                         "longest row)")  # fmt: skip
    ap.add_argument("--attention", nargs="+", default=["auto"],
                    choices=("auto", "triton", "reference", "padded"),
                    help="reuse phase-B attention(s), each a row per cell (auto: the Triton "
                         "kernel on CUDA); e.g. --attention auto padded")  # fmt: skip
    add_threads_arg(ap)
    args = ap.parse_args()
    device = torch.device(args.device)
    apply_threads(args.threads)
    print(machine_line(), flush=True)
    gpu = device.type == "cuda"
    cfg, dtype, scale = (GPU_MODEL, torch.bfloat16, 1) if gpu else (CPU_MODEL, torch.float32, 16)
    torch.manual_seed(0)
    model = ReferenceDecoder(cfg).to(device=device, dtype=dtype)
    shape = model_spec(model)
    loss_fn = hbmplan.losses.PolicyLoss()
    rows, table, notes = [], [], []
    gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "-"  # noqa: E731
    cell = lambda t: f"{t.median * 1e3:.1f} ({100 * t.spread:.0f}%)"  # noqa: E731
    for P0, S0, G in GRID:
        P, S = P0 // scale, S0 // scale
        group = make_group(P, S, G, cfg.vocab_size, device)

        def dense(group=group):
            dense_step(model, [group], loss_fn, args.dense_tokens)
            model.zero_grad(set_to_none=True)

        fns, mems = {"dense": dense}, {}
        for choice in args.attention:
            mem = hbmplan.memory(
                model, tokens_per_microbatch=args.reuse_tokens // scale, attention=choice
            )

            def reuse(group=group, mem=mem):
                with mem:
                    mem.step([group], loss_fn)
                model.zero_grad(set_to_none=True)

            fns[f"reuse[{choice}]"], mems[f"reuse[{choice}]"] = reuse, mem
        timings = time_interleaved(fns, device, args.repeats)
        flops = {"dense": dense_flops(shape, P, [S] * G)}
        flops |= dict.fromkeys(mems, reuse_flops(shape, P, [S] * G, executed=True))
        warned = check_timings(timings, device, flops)
        notes += [f"P={P} S={S} G={G}: {w}" for w in warned]
        ideal = flop_ideal_speedup(shape, P, [S] * G)
        td = timings["dense"]
        for name, mem in mems.items():
            tr = timings[name]
            attention = mem.report().last.attention
            speedup = td.median / tr.median
            row = dict(P=P, S=S, G=G, attention=attention, dense_ms=td.median * 1e3,
                       reuse_ms=tr.median * 1e3, dense_times_s=td.times, reuse_times_s=tr.times,
                       dense_spread=td.spread, reuse_spread=tr.spread,
                       dense_peak_bytes=td.peak, reuse_peak_bytes=tr.peak,
                       speedup=speedup, flop_ideal=ideal, pct_of_ideal=100 * speedup / ideal,
                       warnings=warned)  # fmt: skip
            rows.append(row)
            table.append([P, S, G, attention, cell(td), cell(tr), gib(td.peak), gib(tr.peak),
                          f"{speedup:.2f}x", f"{ideal:.2f}x", f"{row['pct_of_ideal']:.0f}%"
                          + (" (!)" if warned else "")])  # fmt: skip
            print(f"P={P} S={S} G={G} {attention}: {speedup:.2f}x of {ideal:.2f}x "
                  f"(dense {td.describe()}; reuse {tr.describe()})", flush=True)  # fmt: skip
    header = ["P", "S", "G", "attention", "dense ms (spread)", "reuse ms (spread)",
              "dense peak GiB", "reuse peak GiB", "speedup", "FLOP-ideal", "% of ideal"]  # fmt: skip
    md = markdown_table(header, table)
    md += (f"\n\nMedians of {args.repeats} interleaved repetitions after one warmup; spread = "
           f"(max - min) / median. {machine_line()}.")  # fmt: skip
    if notes:
        md += "\n\n**Warnings** (cells marked (!)):\n\n" + "\n".join(f"- {n}" for n in notes)
    command = "python " + " ".join(sys.argv)
    path = write_results("schedule", device, command, md, rows)
    print(md)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
