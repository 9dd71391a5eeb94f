"""Shared benchmark harness: medians of repeated runs, peak memory, result files named by card
and date (benchmarks/results/<name>_<card>_<yyyy-mm>.md)."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_median(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1):
    """Median wall seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs, and the peak
    device bytes allocated during the timed runs (CUDA only; ``None`` on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return statistics.median(times), peak


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
