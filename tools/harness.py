"""Shared benchmark harness: thread count from the usable CPUs, interleaved repetitions with
median and spread, warnings for noisy or implausible timings, result files named by card and
date (benchmarks/results/<name>_<card>_<yyyy-mm>.md)."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tools.cpus import usable_cpus

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
NOISY_SPREAD = 0.15
"""A timing whose (max - min) / median over the repetitions exceeds this is flagged as noisy."""
PLAUSIBLE_RATE_RATIO = 1.3
"""Dense and reuse run the same kernels; achieved FLOP rates further apart than this factor
(reuse faster on any device; either way on CPU) point at a disturbed measurement."""


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch CPU threads (default: the CPUs this process may use)."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the CPUs this process may use, from its "
                             f"affinity and cgroup CPU limit; here {usable_cpus()})")  # fmt: skip


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads`` (default :func:`tools.cpus.usable_cpus`) and
    return it; warns when it exceeds the usable CPUs (timings would collapse)."""
    usable = usable_cpus()
    if threads is not None and threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {threads}")
    n = usable if threads is None else threads
    torch.set_num_threads(n)
    if n > usable:
        warn(f"--threads {n} exceeds the {usable} CPUs this process may use: threads will wait "
             "on each other and CPU timings will not mean much")  # fmt: skip
    return n


def warn(message: str) -> str:
    """Print ``message`` as a loud warning on stderr and return it (for result files)."""
    bar = "!" * 78
    print(f"{bar}\nWARNING: {message}\n{bar}", file=sys.stderr, flush=True)
    return message


def machine_line() -> str:
    """Threads, usable CPUs and the load average, for the header of a benchmark's output."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{torch.get_num_threads()} torch threads on {usable_cpus()} usable CPUs; load average {load}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall seconds of one function over repetitions, and the peak device bytes of its runs."""

    times: list[float]
    peak: int | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median."""
        return (max(self.times) - min(self.times)) / self.median

    def describe(self, unit: float = 1e-3, name: str = "ms") -> str:
        """e.g. ``412.3 ms median of 5 (405.1-431.0 ms, spread 6%)``."""
        lo, hi = min(self.times) / unit, max(self.times) / unit
        return (f"{self.median / unit:.1f} {name} median of {len(self.times)} "
                f"({lo:.1f}-{hi:.1f} {name}, spread {100 * self.spread:.0f}%)")  # fmt: skip


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, Timing]:
    """Time every function in ``fns`` ``repeats`` times, interleaved: each repetition runs all of
    them, in alternating order (A B, then B A), so a slow spell (another process, a clock change)
    falls on all of them instead of on one. Peak device bytes per function on CUDA."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    out = {name: Timing([]) for name in fns}
    order = list(fns)
    for rep in range(repeats):
        for name in order if rep % 2 == 0 else order[::-1]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            out[name].times.append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                out[name].peak = max(out[name].peak or 0, peak)
    return out


def check_timings(
    timings: dict[str, Timing], device: torch.device, flops: dict[str, int] | None = None
) -> list[str]:
    """Loud warnings (also returned, for result files) when a timing is noisy (spread above
    :data:`NOISY_SPREAD`) or when the achieved FLOP rates of ``flops``' entries (``name -> FLOPs
    per run``; the first is the baseline) are implausibly far apart (:data:`PLAUSIBLE_RATE_RATIO`).
    """
    found = []
    for name, t in timings.items():
        if t.spread > NOISY_SPREAD:
            found.append(warn(
                f"noisy measurement: {name} {t.describe()} exceeds {100 * NOISY_SPREAD:.0f}%. "
                f"Something else is using these CPUs or the device ({machine_line()}); rerun on "
                "an idle machine, with fewer --threads, or with more --repeats."
            ))  # fmt: skip
    if flops:
        base, *others = [n for n in flops if n in timings]
        rate0 = flops[base] / timings[base].median
        for name in others:
            ratio = flops[name] / timings[name].median / rate0
            high = ratio > PLAUSIBLE_RATE_RATIO
            low = device.type == "cpu" and ratio < 1 / PLAUSIBLE_RATE_RATIO
            if high or low:
                found.append(warn(
                    f"implausible measurement: {name} ran at {ratio:.2f}x the achieved FLOP rate "
                    f"of {base} ({flops[name] / timings[name].median / 1e9:.1f} vs "
                    f"{rate0 / 1e9:.1f} GFLOP/s); both run the same kernels, so on "
                    f"{device.type} the rates should agree within {PLAUSIBLE_RATE_RATIO}x. The "
                    f"speedup is {'over' if high else 'under'}stated: threads oversubscribed, "
                    f"another process, a cold cache, or (reuse slower) fixed per-step costs "
                    f"dominating a problem this small ({machine_line()})."
                ))  # fmt: skip
    return found


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def card_slug(device: torch.device) -> str:
    name = card_name(device).lower()
    for known in ("h200", "h100", "a100", "l40s", "b200"):
        if known in name:
            return known
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def write_results(name: str, device: torch.device, command: str, table: str, rows: list[dict]):
    """Write Markdown (card, torch, date, command, table) and JSON beside it; return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    today = _dt.date.today()
    stem = f"{name}_{card_slug(device)}_{today:%Y-%m}"
    md = RESULTS / f"{stem}.md"
    md.write_text(
        f"# {name}\n\n- card: {card_name(device)}\n- torch: {torch.__version__}\n"
        f"- date: {today.isoformat()}\n- command: `{command}`\n\n{table}\n"
    )
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    return md


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
