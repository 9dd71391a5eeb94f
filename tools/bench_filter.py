"""Token filtering: backward time with 0/20/40/50% of tokens filtered, and exact skipping on a
GRPO trace.

    python tools/bench_filter.py [--hidden 1024 --layers 2 --tokens 1024 --repeats 5]
                                 [--trace DIR --steps N] [--threads N] [--no-write]

Part 1 (Collider-style filtering, approximate): a reference decoder (h >= 1024, head dim 128,
fp32 on CPU, bf16 on a GPU) runs one row of ``--tokens`` tokens; its forward runs under the
filter (forward unchanged) and the backward is timed alone: no filtering, the gathered fast path
at 0/20/40/50% of tokens filtered (random positions), and the masked reference at 40%. Beside the
whole backward, the linear layers' backward GEMMs alone: ``dy W`` and ``dy^T x`` on all rows vs
on the kept rows (and with the gather/scatter the fast path adds). Published: Collider -35.1%
backward at 40% filtered, Centrifuge -49.9% at 50%. The relative distance of the filtered
gradient from the exact one, ``||g_f - g|| / ||g||`` over all parameters, is reported too.

Part 2 (exact skipping): the groups of a trace recorded by ``tools/grpo_trace.py record``
replayed through ``hbmplan.memory(...).step`` with exact skipping on and off, from the trace's
init (no optimizer: the step's work is what is compared). Rewards as recorded (partial credit,
which rarely ties), and as pass/fail (reward >= ``--pass-at``), a verifier-style reward whose
all-fail and all-pass groups tie; advantages from ``group_advantages``.
Reported: responses, groups and tokens skipped, step time with and without skipping.

Medians of interleaved repetitions (tools/harness.py); writes
benchmarks/results/filter_<card>_<yyyy-mm>.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hbmplan
from hbmplan.kernels.filtered_linear import RowKeep, grad_mask
from hbmplan.losses import group_advantages
from hbmplan.models import DecoderConfig, ReferenceDecoder
from hbmplan.schedules.filtering import filtered_rows
from hbmplan.token_filter import AdvantageRatio, EntropyQuantile
from tools.harness import (
    add_threads_arg,
    apply_threads,
    machine_line,
    markdown_table,
    sync,
    warn,
    write_results,
)

FRACTIONS = (0.0, 0.2, 0.4, 0.5)
CLOCK = [time.perf_counter]
"""The timer: wall time, or (``--clock thread``, CPU with one thread) this thread's CPU time,
which a box loaded by other processes does not inflate (time spent descheduled is not counted;
memory-bandwidth contention still is)."""
PUBLISHED = {0.4: "Collider -35.1%", 0.5: "Centrifuge -49.9%"}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=None, help="default 2.75 x hidden")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--trace", type=Path, default=None, help="a tools/grpo_trace.py record dir")
    ap.add_argument("--steps", type=int, default=None, help="replay only the first N steps")
    ap.add_argument("--trace-repeats", type=int, default=3, help="timed passes over the trace")
    ap.add_argument("--pass-at", type=float, default=0.2,
                    help="pass/fail rewards: pass when the recorded reward is >= this")  # fmt: skip
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="thread: this thread's CPU time (needs --threads 1, CPU), for a loaded box")  # fmt: skip
    ap.add_argument("--no-write", action="store_true", help="print, write no result files")
    add_threads_arg(ap)
    return ap.parse_args(argv)


def _forward(model, ids, positions, keep, impl):
    """The forward (keep ``None``: unfiltered; else under the filter with ``keep`` set)."""
    if keep is None:
        return model(ids, positions)[0]
    rows = RowKeep(ids.shape[1])
    rows.set(keep)
    with filtered_rows(rows, impl):
        hidden = model(ids, positions)[0]
    return grad_mask(hidden, rows)


def backward_timings(model, ids, weights, keeps, repeats, device):
    """Median backward seconds per setting: forward (untimed), then the backward alone."""
    positions = torch.arange(ids.shape[1], device=device)[None]

    def run(name):
        impl, keep = keeps[name]
        model.zero_grad(set_to_none=True)
        hidden = _forward(model, ids, positions, keep, impl)
        loss = (hidden.float() * weights).sum()
        sync(device)
        t0 = CLOCK[0]()
        loss.backward()
        sync(device)
        return CLOCK[0]() - t0

    times = {name: [] for name in keeps}
    for name in keeps:  # warm-up
        run(name)
    order = list(keeps)
    for rep in range(repeats):
        for name in order if rep % 2 == 0 else order[::-1]:
            times[name].append(run(name))
    return times


def gradient_distance(model, ids, weights, keep):
    """||g_filtered - g|| / ||g|| over all parameters (fp32), same inputs."""
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    grads = []
    for k in (None, keep):
        model.zero_grad(set_to_none=True)
        hidden = _forward(model, ids, positions, k, "gather")
        (hidden.float() * weights).sum().backward()
        grads.append(
            torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        )
    model.zero_grad(set_to_none=True)
    return ((grads[1] - grads[0]).norm() / grads[0].norm()).item()


def gemm_timings(
    cfg: DecoderConfig, T: int, kept: dict[float, torch.Tensor], repeats, device, dtype
):
    """Median seconds of one layer's linear backward GEMMs: all rows, kept rows only, and kept
    rows with the fast path's gather (index_select) and scatter (index_copy into zeros)."""
    h, D = cfg.hidden_size, cfg.dim
    shapes = [(h, cfg.num_heads * D), (h, cfg.num_kv_heads * D), (h, cfg.num_kv_heads * D),
              (cfg.num_heads * D, h), (h, cfg.intermediate_size), (h, cfg.intermediate_size),
              (cfg.intermediate_size, h)]  # fmt: skip
    tensors = [
        (torch.randn(T, i, device=device, dtype=dtype), torch.randn(o, i, device=device, dtype=dtype),
         torch.randn(T, o, device=device, dtype=dtype))
        for i, o in shapes
    ]  # fmt: skip

    def full():
        for x, w, dy in tensors:
            dy @ w
            dy.t() @ x

    def only(idx):
        sub = [(x[: idx.numel()], w, dy[: idx.numel()]) for x, w, dy in tensors]

        def fn():
            for x, w, dy in sub:
                dy @ w
                dy.t() @ x

        return fn

    def gathered(idx):
        def fn():
            for x, w, dy in tensors:
                dyk, xk = dy.index_select(0, idx), x.index_select(0, idx)
                dx = dy.new_zeros(x.shape)
                dx.index_copy_(0, idx, dyk @ w)
                dyk.t() @ xk

        return fn

    fns = {"all rows": full}
    for frac, idx in kept.items():
        fns[f"{frac:.0%} GEMM"] = only(idx)
        fns[f"{frac:.0%} gather"] = gathered(idx)
    times = {n: [] for n in fns}
    for fn in fns.values():
        fn()
    order = list(fns)
    for rep in range(repeats):
        for name in order if rep % 2 == 0 else order[::-1]:
            sync(device)
            t0 = CLOCK[0]()
            fns[name]()
            sync(device)
            times[name].append(CLOCK[0]() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def part_filtering(args, device, dtype):
    h = args.hidden
    cfg = DecoderConfig(vocab_size=256, hidden_size=h, num_layers=args.layers,
                        num_heads=max(1, h // 128), num_kv_heads=max(1, h // 512),
                        intermediate_size=args.ffn or int(2.75 * h), max_positions=args.tokens + 1)  # fmt: skip
    torch.manual_seed(0)
    model = ReferenceDecoder(cfg).to(device=device, dtype=dtype)
    T = args.tokens
    ids = torch.randint(0, cfg.vocab_size, (1, T), device=device)
    weights = torch.randn(1, T, h, device=device)
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(T, generator=gen)
    keeps, kept_idx = {"no filtering": ("gather", None)}, {}
    for frac in FRACTIONS:
        keep = torch.ones(T, dtype=torch.bool)
        keep[perm[: round(frac * T)]] = False
        keeps[f"{frac:.0%} gather"] = ("gather", keep.to(device))
        kept_idx[frac] = keep.nonzero().squeeze(1).to(device)
    keeps["40% reference"] = ("reference", keeps["40% gather"][1])
    times = backward_timings(model, ids, weights, keeps, args.repeats, device)
    base = statistics.median(times["no filtering"])
    gemm = gemm_timings(cfg, T, kept_idx, args.repeats, device, dtype)
    share = gemm["all rows"] * cfg.num_layers / base
    rows, table = [], []
    for frac in FRACTIONS:
        name = f"{frac:.0%} gather"
        t = statistics.median(times[name])
        spread = (max(times[name]) - min(times[name])) / t
        g_only = gemm[f"{frac:.0%} GEMM"] / gemm["all rows"]
        g_gath = gemm[f"{frac:.0%} gather"] / gemm["all rows"]
        dist = gradient_distance(model, ids, weights, keeps[name][1]) if frac else 0.0
        row = dict(filtered=frac, backward_ms=1e3 * t, backward_ratio=t / base,
                   spread=spread, gemm_ratio=g_only, gemm_gather_ratio=g_gath,
                   grad_distance=dist, gemm_all_rows_ms=1e3 * gemm["all rows"],
                   linear_share=share)  # fmt: skip
        rows.append(row)
        table.append([f"{frac:.0%}", f"{1e3 * t:.1f}", f"{t / base:.3f} ({t / base - 1:+.1%})",
                      f"{g_only:.3f}", f"{g_gath:.3f}", f"{dist:.3g}", PUBLISHED.get(frac, "")])  # fmt: skip
    ref = statistics.median(times["40% reference"])
    table.append(
        ["40% (masked reference)", f"{1e3 * ref:.1f}", f"{ref / base:.3f}", "", "", "", ""]
    )
    header = ["filtered", "backward ms", "backward / unfiltered", "GEMMs / all rows",
              "GEMMs+gather / all rows", "||g_f - g|| / ||g||", "published"]  # fmt: skip
    intro = (f"Model: reference decoder h={h}, {cfg.num_layers} layers, {cfg.num_heads} heads "
             f"(D={cfg.dim}), {cfg.num_kv_heads} KV heads, ffn {cfg.intermediate_size}, {dtype}; "
             f"one row of {T} tokens; unfiltered backward {1e3 * base:.1f} ms (median of "
             f"{args.repeats}). GEMM columns: one layer's 7 linear backward GEMM pairs, "
             f"{1e3 * gemm['all rows']:.1f} ms on all rows: x {cfg.num_layers} layers = "
             f"{share:.0%} of the unfiltered backward, so filtering a fraction f of the rows can "
             f"save at most about f x {share:.0%} of it while attention's and the elementwise "
             f"ops' backward stay full size.")  # fmt: skip
    for r in rows:
        if r["spread"] > 0.15:
            warn(f"noisy backward timing at {r['filtered']:.0%} filtered (spread "
                 f"{r['spread']:.0%}; {machine_line()})")  # fmt: skip
    return intro + "\n\n" + markdown_table(header, table), rows


def part_trace(args, device):
    from tools.grpo_record import group_from, load_trace, policy_loss
    from tools.grpo_replay import fresh_model

    trace = load_trace(args.trace)
    model = fresh_model(trace).to(device)
    loss_fn = policy_loss(trace.train)
    steps = trace.meta["steps"][: args.steps] if args.steps else trace.meta["steps"]
    out_rows, table = [], []
    variants = [
        ("as recorded (partial credit)", False),
        (f"pass/fail (reward >= {args.pass_at:g})", True),
    ]
    for label, binarize in variants:
        batches = []
        for meta in steps:
            groups = []
            for j in meta["groups"]:
                g = group_from(trace.tensors, j)
                rewards = trace.tensors[f"group/{j}/rewards"]
                rewards = (rewards >= args.pass_at).float() if binarize else rewards
                g.data = {**g.data, "advantages": group_advantages(rewards)}
                groups.append(g)
            batches.append(groups)
        totals = {True: [], False: []}
        counts = dict(responses=0, groups=0, tokens=0)
        for rep in range(args.trace_repeats + 1):  # the first pass warms up
            for skip in (True, False) if rep % 2 else (False, True):
                with hbmplan.memory(model, skip_inert=skip) as mem:
                    sync(device)
                    t0 = CLOCK[0]()
                    for groups in batches:
                        stats = mem.step(groups, loss_fn)
                        model.zero_grad(set_to_none=True)
                        if rep == 0 and skip:
                            counts["responses"] += stats.skipped.responses
                            counts["groups"] += stats.skipped.groups
                            counts["tokens"] += stats.skipped.tokens
                    sync(device)
                if rep:
                    totals[skip].append(CLOCK[0]() - t0)
        n_resp = sum(g.group_size for b in batches for g in b)
        n_groups = sum(len(b) for b in batches)
        n_tokens = sum(sum(g.response_lens) for b in batches for g in b)
        on, off = statistics.median(totals[True]), statistics.median(totals[False])
        row = dict(rewards=label, steps=len(steps), **counts, all_responses=n_resp,
                   all_groups=n_groups, all_tokens=n_tokens, seconds_skip=totals[True],
                   seconds_noskip=totals[False])  # fmt: skip
        out_rows.append(row)
        table.append([label, len(steps),
                      f"{counts['responses']}/{n_resp} ({counts['responses'] / n_resp:.0%})",
                      f"{counts['groups']}/{n_groups} ({counts['groups'] / n_groups:.0%})",
                      f"{counts['tokens'] / n_tokens:.0%}",
                      f"{on:.2f} s vs {off:.2f} s ({on / off - 1:+.0%})"])  # fmt: skip
    header = ["rewards", "steps", "responses skipped", "groups skipped", "response tokens",
              "step time, skip on vs off"]  # fmt: skip
    m = trace.meta["model"]
    intro = (f"Trace {args.trace} (model {m}, group {trace.train.group}, prompt "
             f"{trace.task.prompt_len} tokens, each batch trained {trace.train.updates_per_batch}x); "
             f"all steps' groups stepped with exact skipping on and off, interleaved, from the "
             f"trace's init, fp32; median of {args.trace_repeats} passes after a warm-up.")  # fmt: skip
    text = intro + "\n\n" + markdown_table(header, table)
    dist_text, dist_rows = trace_gradient_distance(trace, model, loss_fn, steps, group_from)
    return text + "\n\n" + dist_text, out_rows + dist_rows


def trace_gradient_distance(trace, model, loss_fn, steps, group_from):
    """Distance of filtered from exact gradients on the trace's groups (recorded advantages,
    PolicyLoss, the init model): ``||g_f - g|| / ||g||`` and cosine, over all parameters."""
    groups = [group_from(trace.tensors, j) for meta in steps for j in meta["groups"]][::2]

    def grads(token_filter):
        model.zero_grad(set_to_none=True)
        with hbmplan.memory(model, token_filter=token_filter) as mem:
            dropped = sum(mem.step([g], loss_fn).filtered_tokens for g in groups)
        flat = torch.cat(
            [p.grad.flatten().double() for p in model.parameters() if p.grad is not None]
        )
        model.zero_grad(set_to_none=True)
        return flat, dropped

    exact, _ = grads(None)
    n_tokens = sum(sum(g.response_lens) for g in groups)
    rows, table = [], []
    for f in (EntropyQuantile(fraction=0.8), EntropyQuantile(fraction=0.6),
              EntropyQuantile(fraction=0.5), AdvantageRatio(threshold=0.5)):  # fmt: skip
        got, dropped = grads(f)
        dist = ((got - exact).norm() / exact.norm()).item()
        cos = torch.nn.functional.cosine_similarity(got, exact, dim=0).item()
        rows.append(
            dict(filter=repr(f), dropped=dropped, tokens=n_tokens, distance=dist, cosine=cos)
        )
        table.append([repr(f).replace("impl='gather', ", ""), f"{dropped / n_tokens:.0%}",
                      f"{dist:.3f}", f"{cos:.3f}"])  # fmt: skip
    intro = (f"Filtered vs exact gradient on the trace's {len(groups)} distinct groups (recorded "
             "advantages, PolicyLoss, the init model, fp32), all parameters together:")  # fmt: skip
    return intro + "\n\n" + markdown_table(
        ["token_filter", "tokens dropped", "||g_f - g|| / ||g||", "cosine(g_f, g)"], table
    ), rows


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.clock == "thread":
        if device.type != "cpu" or torch.get_num_threads() != 1:
            raise SystemExit("--clock thread needs the CPU and --threads 1 (ops on this thread)")
        CLOCK[0] = time.thread_time
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(machine_line() + f"; clock: {args.clock}", flush=True)
    text, rows = part_filtering(args, device, dtype)
    sections = ["## Collider-style filtering: backward time\n\n" + text]
    print(sections[-1], flush=True)
    if args.trace is not None:
        text, trace_rows = part_trace(args, device)
        sections.append("## Exact skipping on a GRPO trace\n\n" + text)
        print(sections[-1], flush=True)
        rows = rows + trace_rows
    if not args.no_write:
        command = "python tools/bench_filter.py " + " ".join(sys.argv[1:] if argv is None else argv)
        md = write_results(
            "filter", device, command, machine_line() + "\n\n" + "\n\n".join(sections), rows
        )
        print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
