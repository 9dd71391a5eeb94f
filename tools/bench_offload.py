"""Offload benchmark: reuse with and without offload against the dense trainer.

GPU: four Llama3-8B-shaped layers, bf16, P=16384, S=1024, G=16 (docs/design.md). Reports the phase-B
peak with offload against reuse without it (target: >= 75% lower), the whole step's peak against
the dense trainer's (target: lower), step-time overhead of offload (target: <= 5%), achieved link
GB/s (target: >= 90% of the pinned ceiling), and writes a PNG of peak memory by phase.
CPU: a scaled-down run of the same code (peaks are the schedule's held bytes, not HBM), as many
torch threads as CPUs this process may use (``--threads``). The variants run interleaved; each
reports the median and spread of its repetitions, with a loud warning when they are noisy or the
dense and reuse FLOP rates are implausibly far apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hbmplan
from hbmplan.capacity import model_spec
from hbmplan.capacity.flops import dense_flops, reuse_flops
from hbmplan.models import ReferenceDecoder
from hbmplan.schedules import dense_step
from tools.bench_schedule import CPU_MODEL, GPU_MODEL, make_group
from tools.harness import (
    RESULTS,
    add_threads_arg,
    apply_threads,
    card_slug,
    check_timings,
    machine_line,
    markdown_table,
    time_interleaved,
    write_results,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt", type=int, default=None)
    ap.add_argument("--response", type=int, default=None)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reuse-tokens", type=int, default=4096)
    ap.add_argument("--budget", default=None, help="also run offload='auto' under this budget")
    add_threads_arg(ap)
    args = ap.parse_args()
    device = torch.device(args.device)
    apply_threads(args.threads)
    print(machine_line(), flush=True)
    gpu = device.type == "cuda"
    cfg, dtype = (GPU_MODEL, torch.bfloat16) if gpu else (CPU_MODEL, torch.float32)
    P = args.prompt or (16384 if gpu else 1024)
    S = args.response or (1024 if gpu else 64)
    torch.manual_seed(0)
    model = ReferenceDecoder(cfg).to(device=device, dtype=dtype)
    group = make_group(P, S, args.group, cfg.vocab_size, device)
    loss_fn = hbmplan.losses.PolicyLoss()
    tpm = args.reuse_tokens if gpu else args.reuse_tokens // 16

    runs: dict[str, dict] = {}

    def dense():
        runs.setdefault("dense", {})["stats"] = dense_step(model, [group], loss_fn)
        model.zero_grad(set_to_none=True)

    def reuse_with(name: str, **kw):
        mem = hbmplan.memory(model, tokens_per_microbatch=tpm, **kw)

        def run():
            with mem:  # the host pool is allocated on first use and reused while warm
                runs.setdefault(name, {})["stats"] = mem.step([group], loss_fn)
            model.zero_grad(set_to_none=True)

        return run

    variants = {"dense": dense, "reuse": reuse_with("reuse", offload="off"),
                "reuse+offload": reuse_with("reuse+offload", offload="all")}  # fmt: skip
    if args.budget:
        variants["reuse+budget"] = reuse_with("reuse+budget", hbm_budget=args.budget)
    timings = time_interleaved(variants, device, args.repeats)
    for name, t in timings.items():
        runs[name].update(seconds=t.median, peak=t.peak, times=t.times, spread=t.spread)
        print(f"{name}: {t.describe()}", flush=True)
    shape, lens = model_spec(model), [S] * args.group
    flops = {"dense": dense_flops(shape, P, lens)}
    flops |= dict.fromkeys(timings.keys() - {"dense"}, reuse_flops(shape, P, lens, executed=True))
    warned = check_timings(timings, device, flops)

    gib = 2**30
    header = ["schedule", "step ms (spread)", "step peak GiB", "A GiB", "B GiB", "C GiB", "offloaded GiB",
              "D2H GB/s", "H2D GB/s", "exposed ms"]  # fmt: skip
    rows, table = [], []
    for name, r in runs.items():
        st = r["stats"]
        phases = {k: v.peak_bytes for k, v in st.phases.items()}
        eng = st.offload.engine if getattr(st, "offload", None) is not None else None
        step_peak = r["peak"] if r["peak"] is not None else st.peak_bytes
        row = dict(schedule=name, ms=r["seconds"] * 1e3, times_s=r["times"], spread=r["spread"],
                   step_peak=step_peak, phases=phases,
                   offloaded=eng.bytes_offloaded if eng else 0,
                   d2h_gbps=eng.d2h_gbps if eng else None, h2d_gbps=eng.h2d_gbps if eng else None,
                   exposed_ms=eng.exposed_wait_s * 1e3 if eng else None)  # fmt: skip
        rows.append(row)
        table.append([name, f"{row['ms']:.1f} ({100 * r['spread']:.0f}%)", f"{step_peak / gib:.2f}",
                      *(f"{phases[k] / gib:.2f}" if k in phases else "-" for k in ("A", "B", "C")),
                      f"{row['offloaded'] / gib:.2f}",
                      f"{row['d2h_gbps']:.1f}" if eng else "-", f"{row['h2d_gbps']:.1f}" if eng else "-",
                      f"{row['exposed_ms']:.1f}" if eng else "-"])  # fmt: skip
    base, off = runs["reuse"], runs["reuse+offload"]
    b_cut = 1 - off["stats"].phases["B"].peak_bytes / base["stats"].phases["B"].peak_bytes
    overhead = off["seconds"] / base["seconds"] - 1
    summary = (
        f"phase-B peak with offload: {100 * b_cut:.1f}% lower than reuse without offload; "
        f"step time overhead {100 * overhead:+.1f}%"
    )
    md = markdown_table(header, table) + "\n\n" + summary
    md += (f"\n\nMedians of {args.repeats} interleaved repetitions after one warmup; spread = "
           f"(max - min) / median. {machine_line()}.")  # fmt: skip
    if warned:
        md += "\n\n**Warnings**:\n\n" + "\n".join(f"- {w}" for w in warned)
    _plot(rows, RESULTS / f"offload_{card_slug(device)}_timeline.png")
    path = write_results("offload", device, "python " + " ".join(sys.argv), md, rows)
    print(md)
    print(f"written to {path}")


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install hbmplan[plot]): no PNG written")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    names = ["A", "B", "C", "dense"]
    for i, row in enumerate(rows):
        xs = [n for n in names if n in row["phases"]]
        ax.plot(xs, [row["phases"][n] / 2**30 for n in xs], marker="o", label=row["schedule"])
        ax.annotate(row["schedule"], (len(xs) - 1, row["phases"][xs[-1]] / 2**30), fontsize=7,
                    xytext=(4, 2 * i), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("phase")
    ax.set_ylabel("peak GiB")
    ax.set_title("peak memory by phase")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
