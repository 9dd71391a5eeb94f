"""Prefix attention, forward and forward+backward: hbmplan's Triton kernel against (a) SDPA with a
lower-right causal bias and GQA over [prompt; own] K/V per response (padded batch), (b) compiled
FlexAttention with a block mask over the packed responses, (c) SDPA flash on the equivalent single
causal sequence [prompt; r1; ...; rG]. GPU only.

FLOPs: 4 * Hq * D per (query, visible key) forward, backward 2.5x forward (5 matmuls to 2), so
TFLOP/s compare like with like; (c) counts its own (larger) causal problem. Times are medians of
CUDA-event timings after warmup, with their spread ((max - min) / median; a loud warning above
15%). Writes benchmarks/results/attention_<card>_<yyyy-mm>.{md,json};
prints the table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hbmplan.kernels import launch, prefix_attention
from tools.harness import (
    NOISY_SPREAD,
    add_threads_arg,
    apply_threads,
    machine_line,
    markdown_table,
    warn,
    write_results,
)

BWD_OVER_FWD = 2.5


def cuda_times(fn: Callable[[], object], repeats: int, warmup: int) -> list[float]:
    """Seconds of each of ``repeats`` runs of ``fn``, each timed by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def cuda_time(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, each timed by CUDA events."""
    return statistics.median(cuda_times(fn, repeats, warmup))


def gemm_tflops(repeats: int) -> float:
    """This card's bf16 GEMM rate (8192^3), the ceiling the targets are stated against."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / cuda_time(lambda: a @ b, repeats, 3) / 1e12


@dataclasses.dataclass
class Problem:
    """One prompt with G packed responses of length S, packed layout [T, H, D]."""

    prompt: int
    responses: int
    length: int
    hq: int
    hkv: int
    d: int

    def __post_init__(self) -> None:
        g = torch.Generator(device="cuda").manual_seed(self.prompt)
        t, p = self.responses * self.length, self.prompt

        def rand(*shape):
            return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)

        self.q, self.k, self.v = (
            rand(t, self.hq, self.d),
            rand(t, self.hkv, self.d),
            rand(t, self.hkv, self.d),
        )
        self.kp, self.vp = rand(p, self.hkv, self.d), rand(p, self.hkv, self.d)
        self.dout = rand(t, self.hq, self.d)
        self.cu = torch.arange(0, t + 1, self.length, dtype=torch.int32, device="cuda")

    @property
    def fwd_flops(self) -> float:
        """Query j of a response sees P + j + 1 keys."""
        s = self.length
        keys = self.responses * (s * self.prompt + s * (s + 1) // 2)
        return 4 * self.hq * self.d * keys

    def leaves(self, *xs):
        return [x.detach().clone().requires_grad_() for x in xs]


def hbmplan_kernel(pb: Problem, deterministic: bool):
    q, k, v = pb.leaves(pb.q, pb.k, pb.v)
    kp, vp = pb.leaves(pb.kp, pb.vp)
    cache = tuple(torch.zeros_like(pb.kp, dtype=torch.float32) for _ in range(2))

    def fwd():
        return prefix_attention(
            q, kp, vp, k, v, pb.cu, grad_cache=cache, impl="triton", deterministic=deterministic
        )

    def bwd(out):
        torch.autograd.grad(out, (q, k, v), pb.dout)

    return fwd, bwd, pb.fwd_flops


def sdpa_lower_right(pb: Problem):
    """(a): responses as batch rows, K/V = cat(prompt expanded, own) per row."""
    b, s = pb.responses, pb.length

    def rows(x):  # [T, H, D] -> [G, H, S, D]
        return x.view(b, s, *x.shape[1:]).transpose(1, 2).contiguous()

    q, k, v = pb.leaves(rows(pb.q), rows(pb.k), rows(pb.v))
    kp, vp = pb.leaves(pb.kp.transpose(0, 1)[None], pb.vp.transpose(0, 1)[None])
    dout = rows(pb.dout)
    bias = causal_lower_right(s, pb.prompt + s)

    def fwd():
        keys = torch.cat([kp.expand(b, -1, -1, -1), k], dim=2)
        values = torch.cat([vp.expand(b, -1, -1, -1), v], dim=2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, enable_gqa=True)

    def bwd(out):
        torch.autograd.grad(out, (q, k, v, kp, vp), dout)

    return fwd, bwd, pb.fwd_flops


def flex_block_mask(pb: Problem):
    """(b): packed responses against [prompt; all own K/V] with a block mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    t, p = pb.responses * pb.length, pb.prompt
    seq = torch.arange(t, device="cuda") // pb.length

    def visible(b, h, qi, ki):
        own = ki - p
        return (ki < p) | ((seq[qi] == seq[own.clamp(min=0)]) & (own <= qi))

    mask = create_block_mask(visible, None, None, t, p + t, device="cuda", _compile=True)
    flex = torch.compile(flex_attention, dynamic=False)

    def head_first(x):  # [N, H, D] -> [1, H, N, D]
        return x.transpose(0, 1)[None].contiguous()

    q, k, v = pb.leaves(head_first(pb.q), head_first(pb.k), head_first(pb.v))
    kp, vp = pb.leaves(head_first(pb.kp), head_first(pb.vp))
    dout = head_first(pb.dout)

    def fwd():
        keys, values = torch.cat([kp, k], dim=2), torch.cat([vp, v], dim=2)
        return flex(q, keys, values, block_mask=mask, enable_gqa=True)

    def bwd(out):
        torch.autograd.grad(out, (q, k, v, kp, vp), dout)

    return fwd, bwd, pb.fwd_flops


def sdpa_flash_full(pb: Problem):
    """(c): one causal sequence [prompt; r1; ...; rG] through the flash backend; it computes the
    prompt's own attention too, and responses see each other."""
    n = pb.prompt + pb.responses * pb.length
    g = torch.Generator(device="cuda").manual_seed(n)

    def rand(heads):
        return torch.randn(1, heads, n, pb.d, generator=g, device="cuda", dtype=torch.bfloat16)

    q, k, v = pb.leaves(rand(pb.hq), rand(pb.hkv), rand(pb.hkv))
    dout = rand(pb.hq)

    def fwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def bwd(out):
        torch.autograd.grad(out, (q, k, v), dout)

    return fwd, bwd, 4 * pb.hq * pb.d * n * (n + 1) / 2


METHODS = {
    "hbmplan triton": lambda pb: hbmplan_kernel(pb, deterministic=False),
    "hbmplan triton, deterministic": lambda pb: hbmplan_kernel(pb, deterministic=True),
    "(a) SDPA lower-right, GQA, padded": sdpa_lower_right,
    "(b) FlexAttention block mask": flex_block_mask,
    "(c) SDPA flash, full causal": sdpa_flash_full,
}


def measure(make, pb: Problem, repeats: int, warmup: int) -> dict:
    fwd, bwd, flops = make(pb)
    with torch.no_grad():
        t_fwd = cuda_time(fwd, repeats, warmup)
    all_times = cuda_times(lambda: bwd(fwd()), repeats, warmup)
    t_all = statistics.median(all_times)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    bwd(fwd())
    peak = torch.cuda.max_memory_allocated() - base
    return dict(fwd_s=t_fwd, fwd_bwd_s=t_all, spread=(max(all_times) - min(all_times)) / t_all,
                flops=flops * (1 + BWD_OVER_FWD),
                tflops=flops * (1 + BWD_OVER_FWD) / t_all / 1e12, peak_bytes=peak)  # fmt: skip


def sweep(pb: Problem, repeats: int) -> None:
    """Time the kernel under alternative tile configs (for tuning launch.py on a new card)."""
    base = launch.attention_configs(pb.d, torch.bfloat16)
    K = launch.KernelConfig
    options = {
        "fwd": [K(128, 64, 8, 3), K(128, 128, 8, 3), K(64, 64, 4, 3), K(128, 64, 4, 4)],
        "dq": [K(128, 64, 8, 2), K(64, 64, 4, 3), K(128, 32, 8, 3)],
        "dkdv": [K(64, 128, 8, 2), K(32, 128, 4, 3), K(64, 64, 4, 3), K(128, 128, 8, 1)],
    }
    real = launch.attention_configs
    for kernel, configs in options.items():
        for cfg in configs:
            chosen = dataclasses.replace(base, **{kernel: cfg})
            launch.attention_configs = lambda d, dtype, chosen=chosen: chosen
            try:
                r = measure(METHODS["hbmplan triton"], pb, repeats, 2)
                ms = f"fwd {r['fwd_s'] * 1e3:.2f} ms, fwd+bwd {r['fwd_bwd_s'] * 1e3:.2f} ms"
                print(f"P={pb.prompt} {kernel} {cfg}: {ms}, {r['tflops']:.0f} TFLOP/s")
            except Exception as e:  # a config that does not fit this card's shared memory
                print(f"P={pb.prompt} {kernel} {cfg}: failed ({type(e).__name__}: {e})")
            finally:
                launch.attention_configs = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--responses", type=int, default=16)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--sweep", action="store_true", help="time tile configs instead")
    ap.add_argument("--no-write", action="store_true", help="print only")
    add_threads_arg(ap)
    args = ap.parse_args()
    apply_threads(args.threads)
    if not torch.cuda.is_available():
        print(
            "bench_attention.py needs a CUDA GPU (it times Triton and SDPA kernels)",
            file=sys.stderr,
        )
        sys.exit(2)
    device = torch.device("cuda")
    print(machine_line(), flush=True)
    problems = [Problem(p, args.responses, args.length, args.heads, args.kv_heads, args.head_dim)
                for p in args.prompts]  # fmt: skip
    if args.sweep:
        for pb in problems:
            sweep(pb, args.repeats)
        return

    peak = gemm_tflops(args.repeats)
    rows, table, notes = [], [], []
    for pb in problems:
        results = {}
        for name in args.methods:
            try:
                results[name] = measure(METHODS[name], pb, args.repeats, args.warmup)
            except Exception as e:  # e.g. out of memory at 32k for the padded SDPA
                print(f"P={pb.prompt} {name}: failed ({type(e).__name__}: {e})", file=sys.stderr)
            torch.cuda.empty_cache()
            if name in results and results[name]["spread"] > NOISY_SPREAD:
                notes.append(warn(f"noisy measurement: P={pb.prompt} {name} fwd+bwd spread "
                                  f"{100 * results[name]['spread']:.0f}% over {args.repeats} runs "
                                  f"({machine_line()})"))  # fmt: skip
        plain = [results[n]["fwd_bwd_s"] for n in results if n.startswith(("(a)", "(b)"))]
        for name, r in results.items():
            vs = min(plain) / r["fwd_bwd_s"] if plain and name.startswith("hbmplan") else None
            rows.append(dict(prompt=pb.prompt, responses=pb.responses, length=pb.length,
                             method=name, vs_best_ab=vs, gemm_tflops=peak, **r))  # fmt: skip
            table.append([
                pb.prompt, name, f"{r['fwd_s'] * 1e3:.2f}",
                f"{r['fwd_bwd_s'] * 1e3:.2f} ({100 * r['spread']:.0f}%)",
                f"{r['tflops']:.0f}", f"{100 * r['tflops'] / peak:.0f}%",
                f"{r['peak_bytes'] / 2**30:.2f}", f"{vs:.2f}x" if vs else "-",
            ])  # fmt: skip
    header = ["P", "method", "fwd ms", "fwd+bwd ms (spread)", "TFLOP/s", "% of GEMM", "peak GiB",
              "vs best of (a),(b)"]  # fmt: skip
    text = markdown_table(header, table)
    text += (
        f"\n\n{args.responses} responses of {args.length} packed, Hq={args.heads}, "
        f"Hkv={args.kv_heads}, D={args.head_dim}, bf16; bf16 GEMM on this card: {peak:.0f} "
        f"TFLOP/s; FLOPs 4*Hq*D per visible key, backward 2.5x forward; (c) counts its own "
        "full causal sequence. Medians of CUDA-event timings; spread = (max - min) / median."
    )
    if notes:
        text += "\n\n**Warnings**:\n\n" + "\n".join(f"- {n}" for n in notes)
    if not args.no_write:
        path = write_results("attention", device, " ".join(sys.argv), text, rows)
        print(f"wrote {path}")
    print(text)


if __name__ == "__main__":
    main()
