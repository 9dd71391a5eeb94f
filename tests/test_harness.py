"""tools/harness.py: interleaved repetitions, median and spread, the noisy/implausible warnings
and the thread setting that the demo and the benchmarks share; `make demo` end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools import harness
from tools.cpus import usable_cpus
from tools.harness import Timing, check_timings, time_interleaved

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def test_repetitions_interleave_in_alternating_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    out = time_interleaved(fns, CPU, repeats=3, warmup=1)
    assert calls == [*"abc", *"abc", *"cba", *"abc"]
    assert all(len(t.times) == 3 and t.peak is None for t in out.values())
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        time_interleaved(fns, CPU, repeats=0)


def test_median_and_spread():
    t = Timing([0.2, 0.1, 0.4, 0.1, 0.2])
    assert t.median == 0.2 and t.spread == pytest.approx(1.5)
    assert t.describe() == "200.0 ms median of 5 (100.0-400.0 ms, spread 150%)"


def test_noisy_timing_is_flagged(capsys):
    quiet = {"dense": Timing([1.0, 1.02, 0.99]), "reuse": Timing([0.2, 0.201, 0.199])}
    assert check_timings(quiet, CPU) == []
    noisy = {**quiet, "reuse": Timing([0.2, 0.3, 0.2])}
    (found,) = check_timings(noisy, CPU)
    assert found.startswith("noisy measurement: reuse") and "spread 50%" in found
    assert "WARNING: noisy measurement" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("reuse_seconds", "device", "flagged"),
    [(0.2, "cpu", False), (0.17, "cpu", False), (0.1, "cpu", True), (0.3, "cpu", True),
     (0.3, "cuda", False), (0.1, "cuda", True)],
)  # fmt: skip
def test_flop_rates_implausibly_far_apart_are_flagged(reuse_seconds, device, flagged):
    """Dense: 10 GFLOP in 1 s; reuse: 2 GFLOP, so at the same rate 0.2 s. Faster than 0.2/1.3 s
    is flagged everywhere, slower than 0.2*1.3 s on CPU only (a GPU kernel may lose to the
    dense one at long prompts)."""
    timings = {"dense": Timing([1.0]), "reuse": Timing([reuse_seconds])}
    found = check_timings(timings, torch.device(device), {"dense": 10e9, "reuse": 2e9})
    assert bool(found) == flagged
    if flagged:
        assert found[0].startswith("implausible measurement: reuse ran at")


def test_threads_default_to_the_usable_cpus(capsys):
    before = torch.get_num_threads()
    try:
        assert harness.apply_threads(None) == usable_cpus() == torch.get_num_threads()
        assert harness.apply_threads(1) == 1 == torch.get_num_threads()
        harness.apply_threads(usable_cpus() + 1)
        assert "exceeds the" in capsys.readouterr().err
        with pytest.raises(SystemExit, match="--threads must be >= 1, got 0"):
            harness.apply_threads(0)
    finally:
        torch.set_num_threads(before)


def test_demo_prints_median_and_spread():
    """`make demo` runs tools/demo.py; here on a tiny model so the test stays short."""
    tiny = ["--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--ffn", "64",
            "--vocab", "64", "--prompt", "48", "--response", "8", "--group", "3", "--repeats",
            "3", "--threads", "1"]  # fmt: skip
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), *tiny],
                         capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    lines = {line.split(" step ")[0]: line for line in out.stdout.splitlines() if " step " in line}
    for name in ("dense", "reuse"):
        assert "median of 3" in lines[name] and "spread" in lines[name], out.stdout
    assert "speedup" in out.stdout and "FLOP-ideal" in out.stdout
    assert "1 torch threads on" in out.stdout
