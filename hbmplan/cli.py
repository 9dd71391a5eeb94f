"""Command line: ``python -m hbmplan frontier --preset llama3-8b --hbm 80GiB --group 16
--response 1024 [--plot frontier.png]`` prints the estimated capacity frontier (and plots it)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from hbmplan.capacity.frontier import FrontierResult

__all__ = ["main"]

PLOT_GROUPS = (1, 2, 4, 8, 16, 32, 64)
"""Group sizes on the plot's x axis (plus the requested one)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``hbmplan frontier: error: ...`` and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> _Parser:
    parser = _Parser(prog="hbmplan", description="hbmplan command line tools")
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser(
        "frontier",
        help="estimate the longest prompt each schedule trains within an HBM budget",
        description="Estimate (not measure) the capacity frontier: per schedule, the longest "
        "prompt whose training step fits in --hbm.",
    )
    src = f.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="llama3-8b, qwen3-8b or qwen3-30b-a3b")
    src.add_argument("--config", help="path to a Hugging Face config.json (or its directory)")
    f.add_argument("--hbm", required=True, help="device memory, e.g. 80GiB or 141GB")
    f.add_argument("--group", type=int, required=True, help="G, responses per prompt")
    f.add_argument("--response", type=int, required=True, help="S, tokens per response")
    f.add_argument("--dtype", default="bfloat16", help="parameter/activation dtype")
    f.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd", "none"))
    f.add_argument("--fsdp", type=int, default=1, help="FSDP (ZeRO-3) degree")
    f.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    f.add_argument("--rows", type=int, default=1, help="trajectories/responses per microbatch")
    f.add_argument("--margin", type=float, default=0.05, help="fragmentation margin of --hbm")
    f.add_argument("--schedules", default="dense,dense+ckpt,reuse,reuse+offload",
                   help="comma-separated schedules")  # fmt: skip
    f.add_argument("--master-weights", action="store_true", help="count fp32 master weights")
    f.add_argument("--grad-cache-dtype", default=None, help="gK/gV dtype (default fp32)")
    f.add_argument("--fused-gqa", action="store_true",
                   help="CUDA memory-efficient SDPA takes GQA with a mask")  # fmt: skip
    f.add_argument("--attention", default="auto", choices=("auto", "triton", "padded"),
                   help="reuse phase-B attention (auto: the Triton kernel where it applies)")  # fmt: skip
    f.add_argument("--json", action="store_true", help="print JSON instead of the table")
    f.add_argument("--plot", metavar="PNG", help="also plot max prompt against group size")
    return parser


def _plot(path: str, results: dict[int, FrontierResult], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in results[groups[0]].schedules:
        ax.plot(groups, [results[g][name].max_prompt_len for g in groups], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(groups, [str(g) for g in groups])
    ax.set_xlabel("group size G")
    ax.set_ylabel("max prompt length P (tokens)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _frontier(args: argparse.Namespace) -> int:
    from hbmplan.capacity.frontier import Shards, frontier

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'hbmplan[plot]'") from None
    kwargs = dict(
        hbm=args.hbm, response_len=args.response,
        schedules=[s.strip() for s in args.schedules.split(",") if s.strip()],
        dtype=args.dtype, optimizer=args.optimizer, shards=Shards(fsdp=args.fsdp, tp=args.tp),
        fragmentation=args.margin, rows_per_microbatch=args.rows,
        master_weights=args.master_weights, grad_cache_dtype=args.grad_cache_dtype,
        fused_gqa=args.fused_gqa, attention=args.attention,
    )  # fmt: skip
    model = args.preset if args.preset is not None else args.config
    result = frontier(model, group_size=args.group, **kwargs)
    if args.json:
        out = {
            "estimate": True,
            "model": result.model.name,
            "hbm_bytes": result.hbm_bytes,
            "usable_bytes": result.usable_bytes,
            "static_bytes": result.static.total,
            "schedules": {
                k: {"max_prompt_len": v.max_prompt_len, "total_tokens": v.total_tokens,
                    "capped": v.capped, "peak_bytes": v.peak_bytes}
                for k, v in result.schedules.items()
            },
        }  # fmt: skip
        print(json.dumps(out, indent=2))
    else:
        print(result.table())
    if args.plot:
        groups = sorted({*PLOT_GROUPS, args.group})
        results = {g: frontier(model, group_size=g, **kwargs) for g in groups}
        title = (
            f"{result.model.name}, {args.hbm}, fsdp={args.fsdp} tp={args.tp}, S={args.response}, "
            f"{args.rows} row(s)/microbatch "
            "- ESTIMATE"
        )
        _plot(args.plot, results, title)
        print(f"plot written to {args.plot}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad input, one line on stderr)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already on stderr)
        return int(exc.code or 0)
    try:
        return _frontier(args)
    except (ValueError, TypeError, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"hbmplan {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
