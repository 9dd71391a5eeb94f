"""Record a GRPO run with the dense trainer, then replay it with the reuse schedule step for step.

    python tools/grpo_trace.py record --out DIR [--steps 100 --group 8 --prompt-len 512
                                                 --model reference|qwen3 --seed 0 ...]
    python tools/grpo_trace.py replay --trace DIR [--dtype float32 bfloat16] [--offload off all]
                                                  [--out DIR --name STEM]
    python tools/grpo_trace.py record --out DIR --replay [replay options]   # both, in lockstep

``record`` trains a small random-init model (hbmplan's reference decoder or a tiny Hugging Face
Qwen3 built from a config) on the synthetic task of ``tools/grpo_task.py``: G responses sampled
from the model itself, rewards from the checker, group-normalised advantages, ``PolicyLoss``
(old log-probs from the sampling policy; each batch serves ``--updates-per-batch`` optimizer
steps, so the ratio leaves 1 and the clip is exercised), ``dense_step``, gradient clipping,
AdamW. The trace is ``trace.json`` + ``trace.safetensors`` (never pickle).

``replay`` reruns the trace from the same init with ``dense_step`` and ``hbmplan.memory(...).step``
(offload "off" and "all") in fp32 and bf16 (bf16 compute, fp32 master weights and AdamW state),
plus a dense fp64 run as the reference of docs/design.md's tolerance rule, all in lockstep. It checks
fp32 reuse against fp32 dense (<= 1e-5 relative at the last step), offload against no offload
(bitwise) and the tolerance rule (fp32 vs fp64; bf16 vs the fp32 dense run), and writes
``STEM.md`` (table), ``STEM.json`` and ``STEM.png`` (difference curves). Exit status: 0 when every
check passes, 1 when one fails, 2 for bad input (one line on stderr).

``record --replay`` does both at once: the other runs step in lockstep with the recording, and the
recording serves as the dense-fp32 run (a replay recomputes it bit for bit on the same machine
and threads), so the pair costs one dense fp32 run less. The trace and the report both go to
``--out``.

This module is the command line; ``tools/grpo_record.py`` holds the trace format and the training
loop, ``tools/grpo_replay.py`` the lockstep replay, its checks and the report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.grpo_record import (
    TraceError,
    TrainConfig,
    check_out,
    environment,
    load_trace,
    record,
)
from tools.grpo_replay import DTYPES, checks, record_and_replay, replay, summary, write_report
from tools.grpo_task import ModelSpec, TaskConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="train with the dense trainer and save a trace")
    rec.add_argument("--out", type=Path, required=True, help="directory for the trace")
    rec.add_argument("--force", action="store_true", help="overwrite a trace already in --out")
    rec.add_argument("--model", choices=["reference", "qwen3"], default="reference")
    t, m, tr = TaskConfig(), ModelSpec(), TrainConfig()
    for flag, default, typ in [
        ("--prompt-len", t.prompt_len, int), ("--keys", t.num_keys, int),
        ("--max-new-tokens", t.max_new_tokens, int), ("--hidden", m.hidden, int),
        ("--layers", m.layers, int), ("--heads", m.heads, int), ("--kv-heads", m.kv_heads, int),
        ("--ffn", m.ffn, int), ("--steps", tr.steps, int), ("--group", tr.group, int),
        ("--prompts-per-step", tr.prompts_per_step, int),
        ("--updates-per-batch", tr.updates_per_batch, int), ("--lr", tr.lr, float),
        ("--weight-decay", tr.weight_decay, float), ("--adam-eps", tr.adam_eps, float),
        ("--max-grad-norm", tr.max_grad_norm, float), ("--temperature", tr.temperature, float),
        ("--seed", tr.seed, int),
    ]:  # fmt: skip
        rec.add_argument(flag, type=typ, default=default, help=f"default {default}")
    rec.add_argument("--replay", action="store_true",
                     help="replay in lockstep while recording (the replay options below apply)")  # fmt: skip
    rep = sub.add_parser("replay", help="replay a trace with the dense and reuse schedules")
    rep.add_argument("--trace", type=Path, required=True, help="directory written by record")
    rep.add_argument("--steps", type=int, default=None, help="replay only the first N steps")
    rep.add_argument("--out", type=Path, default=None, help="default: the trace directory")
    for p in (rec, rep):
        p.add_argument("--dtype", nargs="+", choices=DTYPES, default=list(DTYPES),
                       help="replay: float32 adds a dense-fp64 reference run")  # fmt: skip
        p.add_argument("--offload", nargs="+", choices=["off", "all"], default=["off", "all"],
                       help="replay: the reuse runs' offload modes")  # fmt: skip
        p.add_argument("--tokens-per-microbatch", type=int, default=None,
                       help="replay: reuse packing budget (default: 4 x max response length)")  # fmt: skip
        p.add_argument("--name", default="replay", help="replay: file stem of the .md/.json/.png")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (record: torch's default; replay: the record's)")  # fmt: skip
    return ap.parse_args(argv)


def _record(args: argparse.Namespace) -> int:
    try:
        task = TaskConfig(args.prompt_len, args.keys, args.max_new_tokens)
        spec = ModelSpec(args.model, args.hidden, args.layers, args.heads, args.kv_heads, args.ffn)
        train = TrainConfig(args.steps, args.group, args.prompts_per_step, args.updates_per_batch,
                            args.lr, args.weight_decay, adam_eps=args.adam_eps,
                            max_grad_norm=args.max_grad_norm, temperature=args.temperature,
                            seed=args.seed)  # fmt: skip
        if args.hidden % args.heads or args.heads % args.kv_heads:
            raise ValueError(f"hidden must divide by heads and heads by kv-heads, got "
                             f"{args.hidden}, {args.heads}, {args.kv_heads}")  # fmt: skip
    except ValueError as err:
        raise TraceError(f"invalid option: {err}") from None
    check_out(args.out, args.force)
    _check_positive(args, "tokens_per_microbatch")
    tpm = args.tokens_per_microbatch or 4 * task.max_new_tokens
    if args.replay:
        trace, result = record_and_replay(args.out, task, spec, train, args.dtype, args.offload,
                                          tpm, not args.no_progress)  # fmt: skip
    else:
        trace = record(args.out, task, spec, train, not args.no_progress)
    rewards = [s["reward_mean"] for s in trace.meta["steps"]]
    k = max(1, len(rewards) // 10)
    print(f"recorded {len(rewards)} steps to {args.out}: mean reward {sum(rewards[:k]) / k:.3f} "
          f"over the first {k}, {sum(rewards[-k:]) / k:.3f} over the last {k}")  # fmt: skip
    return _report(result, trace, args.out, args.name, tpm) if args.replay else 0


def _check_positive(args: argparse.Namespace, *flags: str) -> None:
    for flag in flags:
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise TraceError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")


def _report(result: dict, trace, out: Path, name: str, tpm: int) -> int:
    """Judge a replay's result, write its report to ``out`` and return the exit status."""
    result |= {"environment": environment(), "tokens_per_microbatch": tpm,
               "trace": {k: trace.meta.get(k, {}) for k in ("task", "model", "train", "environment")}}  # fmt: skip
    verdicts = checks(result)
    paths = write_report(out, name, result, verdicts)
    print(summary(verdicts))
    print("written: " + ", ".join(str(p) for p in paths))
    return 1 if any(c["ok"] is False for c in verdicts) else 0


def _replay(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    out = args.out or args.trace
    if out.exists() and not out.is_dir():
        raise TraceError(f"--out must be a directory, got a file: {out}")
    _check_positive(args, "steps", "tokens_per_microbatch")
    if args.threads is None and isinstance(trace.meta.get("threads"), int):
        torch.set_num_threads(trace.meta["threads"])  # the record's summation order
    tpm = args.tokens_per_microbatch or 4 * trace.task.max_new_tokens
    result = replay(trace, args.dtype, args.offload, tpm, args.steps, not args.no_progress)
    return _report(result, trace, out, args.name, tpm)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 a replay check failed, 2 bad input)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise TraceError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        return _record(args) if args.command == "record" else _replay(args)
    except TraceError as err:
        print(f"grpo_trace: error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
