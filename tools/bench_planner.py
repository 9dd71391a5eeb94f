"""Planner benchmark: how long ``make_plan`` takes on a Llama3-8B-like capture (32 layers, one
hot and 15 dormant storages each) under budgets between the smallest feasible and the unlimited
peak. Was a wall-clock assertion (< 10 s) in the tests; it is a number to watch, not a rule.

    python tools/bench_planner.py [--layers 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hbmplan.planner import Lifetime, PlanInputs, make_plan


def capture(layers: int, seed: int = 0) -> PlanInputs:
    rng = random.Random(seed)
    sizes = [rng.choice([2, 4, 7]) * 2**26 for _ in range(15)]
    lts: list[Lifetime] = []
    for layer in range(layers):
        lts.append(Lifetime(len(lts), 10**6, layer, "op", "torch.bfloat16", "A", ("B", "C")))
        lts += [
            Lifetime(len(lts) + j, b, layer, "op", "torch.bfloat16", "A", ("C",))
            for j, b in enumerate(sizes)
        ]
    return PlanInputs(lts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    inputs = capture(args.layers)
    unlimited = make_plan(inputs)
    lo, hi = unlimited.min_feasible, max(unlimited.peak_bytes, unlimited.min_feasible)
    print(f"make_plan, {args.layers} layers x 16 storages, median of {args.repeats}")
    print(f"{'budget':>12}{'seconds':>10}{'offload GiB':>13}{'recompute GiB':>15}")
    for frac in (0.0, 1 / 3, 2 / 3):
        budget = lo + int((hi - lo) * frac)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            plan = make_plan(dataclasses.replace(inputs, budget=budget))
            times.append(time.perf_counter() - t0)
        times.sort()
        print(
            f"{budget / 2**30:>10.1f}Gi{times[len(times) // 2]:>10.3f}"
            f"{plan.offload_bytes / 2**30:>13.1f}{plan.recompute_bytes / 2**30:>15.1f}"
        )


if __name__ == "__main__":
    main()
