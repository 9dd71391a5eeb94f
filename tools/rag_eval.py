"""Multi-turn retrieval evaluation of DH-RAG against its baselines on the synthetic benchmark.

    python tools/rag_eval.py [--seed 0 --entities 160 --dialogues 120] [--out DIR --name STEM]
                             [--no-write] [--no-progress]

Protocol: every method's one free weight (lambda, the history's weight against the query's 1)
is chosen on the ``dev`` split by MRR@10; the ``test`` split (other entities, same corpus) is then
scored once with that lambda. Reported per method: recall@1, recall@5, MRR@10 (overall and per
turn kind), the paired-bootstrap difference to DH-RAG, and for both prompt layouts the share of
each turn's prompt tokens that repeat the previous turn's prompt as a prefix.

Before scoring, two checks that no gold label reaches a method: rankings, responses and history
must be identical when every gold label is changed, and every history entry a prompt shows must
be exactly what that earlier turn retrieved and answered. Exit status: 0 when both hold, 1 when
one fails, 2 for bad input.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hbmplan.rag.evaluate import (
    CAPPED,
    GRID,
    LAYOUTS,
    METHODS,
    Index,
    bootstrap_diff,
    leak_check,
    make_method,
    provenance_check,
    run,
    summarize,
    tune,
)
from hbmplan.rag.synthetic import KINDS, BenchConfig, generate

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
REFERENCE = "dh-rag"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = BenchConfig()
    ap.add_argument("--seed", type=int, default=d.seed, help="benchmark seed")
    ap.add_argument("--entities", type=int, default=d.entities_per_split, help="per split")
    ap.add_argument("--dialogues", type=int, default=d.dialogues_per_split, help="per split")
    ap.add_argument("--min-turns", type=int, default=d.min_turns)
    ap.add_argument("--max-turns", type=int, default=d.max_turns)
    ap.add_argument("--leak-dialogues", type=int, default=8, help="dialogues per leak check")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for the results")
    ap.add_argument("--name", default=None, help="file stem (default rag_eval_cpu_<yyyy-mm>)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def _table(header: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _f(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def environment() -> str:
    import bm25s
    import numpy
    import sklearn
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, numpy {numpy.__version__}, scikit-learn "
        f"{sklearn.__version__}, bm25s {bm25s.__version__}"
    )


def evaluate(args: argparse.Namespace, log=print) -> tuple[dict, list[str]]:
    """Everything the report needs (a JSON-able dict) and the leak/provenance problems."""
    cfg = BenchConfig(
        seed=args.seed,
        entities_per_split=args.entities,
        dialogues_per_split=args.dialogues,
        min_turns=args.min_turns,
        max_turns=args.max_turns,
    )
    bench = generate(cfg)
    index = Index.build(bench.corpus)
    dev, test = bench.splits["dev"], bench.splits["test"]
    log(f"benchmark: {len(bench.corpus)} passages; dev {len(dev)} / test {len(test)} dialogues")

    problems: list[str] = []
    for name in METHODS + CAPPED:
        found = leak_check(
            lambda b, name=name: make_method(name, Index.build(b.corpus), 0.125),
            bench,
            "test",
            args.leak_dialogues,
        )
        problems += [f"{name}: {p}" for p in found]
    log(f"leak check (gold labels changed, {args.leak_dialogues} dialogues): "
        f"{'pass' if not problems else 'FAIL'}")  # fmt: skip

    lam: dict[str, float] = {}
    dev_grid: dict[str, dict[float, float]] = {}
    for name in METHODS:
        t0 = time.perf_counter()
        lam[name], dev_grid[name] = tune(name, index, dev, bench.corpus)
        log(f"tuned {name}: lambda {lam[name]} ({time.perf_counter() - t0:.0f} s)")
    for name in CAPPED:
        lam[name] = lam[REFERENCE]

    scores, dev_mrr = {}, {}
    for name in METHODS + CAPPED:
        results: list = []
        scores[name] = run(make_method(name, index, lam[name]), test, bench.corpus, results=results)
        problems += [f"{name}: {p}" for p in provenance_check(results, test, bench.corpus)]
        if dev_grid.get(name):
            dev_mrr[name] = dev_grid[name][lam[name]]
        else:
            dev_scores = run(make_method(name, index, lam[name]), dev, bench.corpus)
            dev_mrr[name] = summarize(dev_scores)["mrr@10"]
    log(f"provenance check (test, every turn): {'pass' if not problems else 'FAIL'}")

    report = {
        "config": cfg.__dict__,
        "passages": len(bench.corpus),
        "turns": {"dev": sum(len(d.turns) for d in dev), "test": sum(len(d.turns) for d in test)},
        "kinds": {k: sum(t.kind == k for d in test for t in d.turns) for k in KINDS},
        "grid": list(GRID),
        "lambda": lam,
        "dev_mrr": {n: {str(k): v for k, v in g.items()} for n, g in dev_grid.items()},
        "test": {n: summarize(s) for n, s in scores.items()},
        "dev_mrr_at_lambda": dev_mrr,
        "test_by_kind": {n: {k: summarize(s, k) for k in KINDS} for n, s in scores.items()},
        "diff_vs_dhrag": {
            n: bootstrap_diff(scores[REFERENCE], scores[n]) for n in scores if n != REFERENCE
        },
        "problems": problems,
    }
    return report, problems


def render(report: dict, command: str, env: str) -> str:
    names = list(report["test"])
    t = report["test"]
    lp = [f"prefix share, {lay}" for lay in LAYOUTS]
    lt = [f"prompt tokens, {lay}" for lay in LAYOUTS]
    rows = []
    for n in names:
        d = report["diff_vs_dhrag"].get(n)
        diff = "—" if d is None else f"{_f(d[0])} [{_f(d[1])}, {_f(d[2])}]"
        rows.append(
            [n, report["lambda"][n], _f(t[n]["recall@1"]), _f(t[n]["recall@5"]),
             _f(t[n]["mrr@10"]), _f(report["dev_mrr_at_lambda"][n]), diff]
            + [_f(t[n][f"prefix_share[{lay}]"], 2) for lay in LAYOUTS]
            + [f"{t[n][f'prompt_tokens[{lay}]']:.0f}" for lay in LAYOUTS]
        )  # fmt: skip
    main = _table(
        ["method", "λ (dev)", "recall@1", "recall@5", "MRR@10", "dev MRR@10",
         "dh-rag − method, MRR@10 [95% CI]", *lp, *lt],
        rows,
    )  # fmt: skip
    kinds = list(report["kinds"])
    by_kind = _table(
        ["method", *[f"{k} (n={report['kinds'][k]})" for k in kinds]],
        [[n, *[_f(report["test_by_kind"][n][k]["mrr@10"]) for k in kinds]] for n in names],
    )
    grid = _table(
        ["method", *[f"λ={g:g}" for g in report["grid"]]],
        [[n, *[_f(v) for v in g.values()]] for n, g in report["dev_mrr"].items() if g],
    )
    cfg = report["config"]
    checks = "pass" if not report["problems"] else "FAIL:\n" + "\n".join(report["problems"])
    return f"""# Multi-turn retrieval: DH-RAG vs baselines (synthetic benchmark)

- machine: {env}
- date: {_dt.date.today().isoformat()}
- command: `{command}`
- benchmark: `BenchConfig({", ".join(f"{k}={v}" for k, v in cfg.items())})`: {report["passages"]}
  passages (one corpus), dev {report["turns"]["dev"]} turns / test {report["turns"]["test"]} turns
  over disjoint entities
- protocol: λ per method chosen on dev by MRR@10 from {report["grid"]}; test scored once.
  `dh-rag capacity 8*` reuse dh-rag's λ. Confidence intervals: paired bootstrap over test
  dialogues (2000 resamples).
- gold-label checks (changed gold labels give identical rankings, responses and history; every
  history entry is what its turn retrieved and answered): {checks}

## Test split

{main}

Prefix share: mean over turns after the first of (tokens shared as a prefix with the previous
turn's prompt) / (this turn's prompt tokens), HashTokenizer ids. `stable`: the builder's layout
(system, history with its passages oldest first, this turn last); `passages-first`: system,
this turn's passages, history, query.

## Test MRR@10 by turn kind

{by_kind}

## Dev MRR@10 per λ (the tuning)

{grid}
"""


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        BenchConfig(args.seed, args.entities, args.dialogues, args.min_turns, args.max_turns)
    except ValueError as exc:
        print(f"rag_eval: {exc}", file=sys.stderr)
        return 2
    log = (lambda *a, **k: None) if args.no_progress else print
    t0 = time.perf_counter()
    report, problems = evaluate(args, log)
    command = "python tools/rag_eval.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = render(report, command.strip(), environment())
    print(text)
    log(f"total {time.perf_counter() - t0:.0f} s")
    if not args.no_write:
        stem = args.name or f"rag_eval_cpu_{_dt.date.today():%Y-%m}"
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.md").write_text(text)
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
        log(f"wrote {args.out / stem}.md and .json")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
