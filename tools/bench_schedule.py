"""Dense trainer vs reuse schedule over (P, S, G): median ms, peak memory, speedup, % of FLOP-ideal.

GPU: four Llama3-8B-shaped layers (h=4096, 32 heads, 8 KV heads, ffn 14336, vocab 32000), bf16,
the grid of DESIGN.md. CPU: the same grid scaled down (h=256, P/16, S/16), fp32.
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
from hbmplan.capacity.flops import flop_ideal_speedup
from hbmplan.models import DecoderConfig, ReferenceDecoder
from hbmplan.schedules import dense_step
from tools.harness import markdown_table, time_median, write_results

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
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    cfg, dtype, scale = (GPU_MODEL, torch.bfloat16, 1) if gpu else (CPU_MODEL, torch.float32, 16)
    torch.manual_seed(0)
    model = ReferenceDecoder(cfg).to(device=device, dtype=dtype)
    shape = model_spec(model)
    loss_fn = hbmplan.losses.PolicyLoss()
    rows, table = [], []
    gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "-"  # noqa: E731
    for P0, S0, G in GRID:
        P, S = P0 // scale, S0 // scale
        group = make_group(P, S, G, cfg.vocab_size, device)

        def dense(group=group):
            dense_step(model, [group], loss_fn, args.dense_tokens)
            model.zero_grad(set_to_none=True)

        t_d, peak_d = time_median(dense, device, args.repeats)
        ideal = flop_ideal_speedup(shape, P, [S] * G)
        for choice in args.attention:
            mem = hbmplan.memory(
                model, tokens_per_microbatch=args.reuse_tokens // scale, attention=choice
            )

            def reuse(group=group, mem=mem):
                with mem:
                    mem.step([group], loss_fn)
                model.zero_grad(set_to_none=True)

            t_r, peak_r = time_median(reuse, device, args.repeats)
            attention = mem.report().last.attention
            speedup = t_d / t_r
            row = dict(P=P, S=S, G=G, attention=attention, dense_ms=t_d * 1e3,
                       reuse_ms=t_r * 1e3, dense_peak_bytes=peak_d, reuse_peak_bytes=peak_r,
                       speedup=speedup, flop_ideal=ideal,
                       pct_of_ideal=100 * speedup / ideal)  # fmt: skip
            rows.append(row)
            table.append([P, S, G, attention, f"{t_d * 1e3:.1f}", f"{t_r * 1e3:.1f}", gib(peak_d),
                          gib(peak_r), f"{speedup:.2f}x", f"{ideal:.2f}x",
                          f"{row['pct_of_ideal']:.0f}%"])  # fmt: skip
            print(f"P={P} S={S} G={G} {attention}: {speedup:.2f}x of {ideal:.2f}x", flush=True)
    header = ["P", "S", "G", "attention", "dense ms", "reuse ms", "dense peak GiB", "reuse peak GiB",
              "speedup", "FLOP-ideal", "% of ideal"]  # fmt: skip
    md = markdown_table(header, table)
    command = "python " + " ".join(sys.argv)
    path = write_results("schedule", device, command, md, rows)
    print(md)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
