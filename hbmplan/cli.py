"""Command line: ``python -m hbmplan frontier --preset llama3-8b --hbm 80GiB --group 16
--response 1024 [--prompt 32768] [--plot frontier.png]`` prints the estimated capacity frontier
and step times (and plots them)."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from hbmplan.capacity.frontier import FrontierResult

__all__ = ["main"]

PLOT_GROUPS = (1, 2, 4, 8, 16, 32, 64)
"""Group sizes on the plot's capacity panel (plus the requested one)."""

PLOT_POINTS = 24
"""Prompt lengths on the plot's speed panel, evenly spaced up to the longest that fits."""

_NUMERIC_OPTIONS = frozenset(
    {"--hbm", "--group", "--response", "--prompt", "--fsdp", "--tp", "--cp", "--rows", "--margin"}
)
"""Options whose value may start with "-" (a negative number, rejected by its own check)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``hbmplan frontier: error: ...`` and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one (not for flags or required options)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or action.required:
            return action.help
        return super()._get_help_string(action)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _size(text: str) -> int:
    """--hbm: a size with a unit; a bare number is refused (it would silently mean bytes)."""
    from hbmplan.config import parse_bytes

    m = re.fullmatch(r"\s*[0-9]*\.?[0-9]+\s*([a-zA-Z]*)\s*", text)
    if m is not None and not m.group(1):
        raise argparse.ArgumentTypeError(
            f"needs a unit, e.g. {text.strip()}GiB (2^30 bytes) or {text.strip()}GB (10^9 bytes); "
            f"got {text!r}, which would mean {text.strip()} bytes"
        )
    try:
        return parse_bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a positive size with a unit such as 80GiB or 141GB, got {text!r}"
        ) from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(
            f"must be a fraction of --hbm in [0, 1), e.g. 0.05, got {text!r}"
        )
    return value


def _parser() -> _Parser:
    from hbmplan.capacity.step_bytes import SCHEDULES
    from hbmplan.capacity.steptime import CARDS

    parser = _Parser(prog="hbmplan", description="hbmplan command line tools")
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser(
        "frontier",
        help="estimate the longest prompt each schedule trains within an HBM budget",
        description="Estimate (not measure) the capacity frontier: per schedule, the longest "
        "prompt whose training step fits in --hbm, and the step time at one prompt length.",
        formatter_class=_Formatter,
    )
    positive = _int_at_least(1)
    src = f.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="llama3-8b, qwen3-8b or qwen3-30b-a3b")
    src.add_argument("--config", help="path to a Hugging Face config.json (or its directory)")
    f.add_argument("--hbm", type=_size, required=True,
                   help="device memory with a unit, e.g. 80GiB or 141GB")  # fmt: skip
    f.add_argument("--group", type=positive, required=True, help="G, responses per prompt")
    f.add_argument("--response", type=positive, required=True, help="S, tokens per response")
    f.add_argument("--prompt", type=_int_at_least(2), default=None,
                   help="P at which to estimate step times (default: the longest prompt every "
                   "schedule that fits at all can train)")  # fmt: skip
    f.add_argument("--dtype", default="bfloat16", help="parameter/activation dtype")
    f.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd", "none"),
                   help="optimizer whose state is counted")  # fmt: skip
    f.add_argument("--fsdp", type=positive, default=1, help="FSDP (ZeRO-3) degree")
    f.add_argument("--tp", type=positive, default=1,
                   help="tensor-parallel degree; divides the query and key/value heads")  # fmt: skip
    f.add_argument("--cp", type=positive, default=1,
                   help="context-parallel degree: splits the prompt (reuse) or each trajectory "
                        "(dense); only those two schedules, no step times")  # fmt: skip
    f.add_argument("--rows", type=positive, default=1,
                   help="trajectories/responses per microbatch")  # fmt: skip
    f.add_argument("--margin", type=_fraction, default=0.05,
                   help="fraction of --hbm kept free for fragmentation and the CUDA context")  # fmt: skip
    f.add_argument("--schedules", default=",".join(SCHEDULES), help="comma-separated schedules")
    f.add_argument("--card", default="h200", choices=sorted(CARDS),
                   help="measured rates the step time assumes")  # fmt: skip
    f.add_argument("--master-weights", action="store_true", help="count fp32 master weights")
    f.add_argument("--grad-cache-dtype", default=None, help="gK/gV dtype (default fp32)")
    f.add_argument("--fused-gqa", action="store_true",
                   help="CUDA memory-efficient SDPA takes GQA with a mask")  # fmt: skip
    f.add_argument("--attention", default="auto", choices=("auto", "triton", "padded"),
                   help="reuse phase-B attention (auto: the Triton kernel where it applies)")  # fmt: skip
    f.add_argument("--json", action="store_true", help="print JSON instead of the table")
    f.add_argument("--plot", metavar="PNG",
                   help="also plot max prompt and step time against group size")  # fmt: skip
    return parser


def _widths(series: list[list[float]], near: float, log: bool = False) -> list[float]:
    """Line widths so that no line hides another: a series that comes within ``near`` of a
    later-drawn one somewhere (a fraction of the axis range; of decades on a log axis) is drawn
    wider, by one step per such series, and shows around them."""

    def pos(v: float) -> float:
        return math.log10(v) if log and v > 0 else v

    points = [[pos(v) for v in s] for s in series]
    finite = [v for s in points for v in s if math.isfinite(v)]
    span = (max(finite) - min(finite)) if finite else 1.0
    widths = []
    for i, a in enumerate(points):
        under = sum(
            any(abs(x - y) <= near * (span or 1.0) for x, y in zip(a, b, strict=True))
            for b in points[i + 1 :]
        )
        widths.append(1.6 + 2.2 * under)
    return widths


def _plot(
    path: str,
    by_group: dict[int, FrontierResult],
    by_prompt: dict[int, FrontierResult],
    group: int,
    title: str,
) -> None:
    """Left: estimated step time against prompt length at the requested G, each schedule's line
    ending at its capacity. Right: capacity against G, the requested G marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    chosen = by_group[group]
    names = list(chosen.schedules)
    kilo = FuncFormatter(lambda v, _: f"{v / 1000:,.0f}k" if abs(v) >= 1000 else f"{v:,.0f}")
    fig, (speed, cap) = plt.subplots(1, 2, figsize=(13, 5.6), width_ratios=(1.35, 1))
    markers, dashes = "osD^vP", ["-", "--", "-.", ":", (0, (6, 2)), (0, (3, 1, 1, 1))]
    prompts, groups = sorted(by_prompt), sorted(by_group)
    times = [[by_prompt[p][n].time.seconds if by_prompt[p][n].time else math.nan
              for p in prompts] for n in names]  # fmt: skip
    caps = [[by_group[g][n].max_prompt_len for g in groups] for n in names]
    t_width, c_width = _widths(times, 0.01, log=True), _widths(caps, 0.015)
    handles: list[Line2D] = []
    n = len(names)
    for i, name in enumerate(names):
        style = dict(color=f"C{i}", ls=dashes[i % 6], alpha=0.85)
        speed.plot(prompts, times[i], lw=t_width[i], **style)
        end = chosen[name].max_prompt_len
        t = by_prompt[end][name].time if end in by_prompt else None
        if t is not None:  # the capacity: the longest prompt that fits
            speed.plot([end], [t.seconds], marker=markers[i % 6], ms=9, color=f"C{i}",
                       mec="black", ls="none", zorder=5)  # fmt: skip
        cap.plot(groups, caps[i], lw=c_width[i], **style)
        dodge = 2 ** ((i - (n - 1) / 2) * 0.06)  # equal values: markers side by side
        cap.plot([g * dodge for g in groups], caps[i], marker=markers[i % 6], ms=7, ls="none",
                 color=f"C{i}", mec="black", mew=0.6, zorder=4)  # fmt: skip
        handles.append(Line2D([], [], color=f"C{i}", ls=dashes[i % 6], lw=1.8,
                              marker=markers[i % 6], mec="black", mew=0.6, label=name))  # fmt: skip
    speed.set_title(f"speed at G={group}: estimated step time; marker = longest prompt that fits",
                    fontsize=10, pad=16)  # fmt: skip
    speed.set_xlabel("prompt length P (tokens)")
    speed.set_ylabel("seconds per group step, one device (log scale)")
    speed.xaxis.set_major_formatter(kilo)
    if not any(math.isfinite(v) for row in times for v in row):
        why = "no schedule fits" if not chosen.prompt_len else "no measured rate for this dtype"
        speed.text(0.5, 0.5, f"no step-time estimate: {why}", ha="center", va="center",
                   transform=speed.transAxes, fontsize=10, color="0.3")  # fmt: skip
        speed.set_xticks([])
        speed.set_yticks([])
        speed.set_ylabel("")
    else:
        speed.set_yscale("log")
        speed.set_xlim(left=0)
    if chosen.prompt_len and chosen.card is not None:
        speed.axvline(chosen.prompt_len, color="0.3", ls=":", lw=1.2, zorder=1)
        speed.annotate(f"P={chosen.prompt_len:,} (the table's)", (chosen.prompt_len, 1.0),
                       xycoords=("data", "axes fraction"), xytext=(0, 3), ha="center",
                       textcoords="offset points", fontsize=8, color="0.25")  # fmt: skip
    cap.set_title("capacity: longest prompt that fits, by group size", fontsize=10, pad=16)
    cap.set_xscale("log", base=2)
    cap.set_xticks(groups, [str(g) for g in groups])
    cap.minorticks_off()
    cap.set_xlabel("group size G (responses per prompt)")
    cap.set_ylabel("max prompt length P (tokens)")
    cap.yaxis.set_major_formatter(kilo)
    cap.set_ylim(bottom=0)
    if not any(any(row) for row in caps):
        cap.set_ylim(0, 1000)
        cap.text(0.5, 0.5, "nothing fits at any G: static memory alone exceeds usable HBM",
                 ha="center", va="center", transform=cap.transAxes, fontsize=9, color="0.3")  # fmt: skip
    cap.axvline(group, color="0.3", ls=":", lw=1.2, zorder=1)
    cap.annotate(f"requested G={group}", (group, 1.0), xycoords=("data", "axes fraction"),
                 xytext=(0, 3), ha="center", textcoords="offset points", fontsize=8,
                 color="0.25")  # fmt: skip
    for ax in (speed, cap):
        ax.grid(True, alpha=0.3)
    fig.legend(handles=handles, loc="lower center", ncol=n, frameon=False, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _json(result: FrontierResult) -> dict:
    def time(t):
        if t is None:
            return None
        return {"step_seconds": t.seconds, "compute_seconds": t.compute_s,
                "exposed_seconds": t.exposed_s, "flops": t.flops,
                "recomputed_layers": t.recomputed_layers}  # fmt: skip

    return {
        "estimate": True,
        "model": result.model.name,
        "hbm_bytes": result.hbm_bytes,
        "usable_bytes": result.usable_bytes,
        "static_bytes": result.static.total,
        "prompt_len": result.prompt_len,
        "card": None if result.card is None else result.card.name,
        "schedules": {
            k: {"max_prompt_len": v.max_prompt_len, "total_tokens": v.total_tokens,
                "capped": v.capped, "limit": v.limit if v.max_prompt_len else None,
                "peak_bytes": v.peak_bytes, "time_at_prompt_len": time(v.time)}
            for k, v in result.schedules.items()
        },
    }  # fmt: skip


def _frontier(args: argparse.Namespace) -> int:
    from hbmplan.capacity.frontier import Shards, frontier, tp_problem
    from hbmplan.capacity.presets import model_spec

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'hbmplan[plot]'") from None
    spec = model_spec(args.preset if args.preset is not None else args.config)
    problem = tp_problem(spec, args.tp)
    if problem is not None:
        raise ValueError(f"--tp {problem}")
    kwargs = dict(
        hbm=args.hbm, response_len=args.response,
        schedules=[s.strip() for s in args.schedules.split(",") if s.strip()],
        dtype=args.dtype, optimizer=args.optimizer, shards=Shards(fsdp=args.fsdp, tp=args.tp, cp=args.cp),
        fragmentation=args.margin, rows_per_microbatch=args.rows,
        master_weights=args.master_weights, grad_cache_dtype=args.grad_cache_dtype,
        fused_gqa=args.fused_gqa, attention=args.attention, card=args.card,
    )  # fmt: skip
    result = frontier(spec, group_size=args.group, prompt_len=args.prompt, **kwargs)
    print(json.dumps(_json(result), indent=2) if args.json else result.table())
    if args.plot:
        groups = sorted({*PLOT_GROUPS, args.group})
        by_group = {g: frontier(spec, group_size=g, **kwargs) for g in groups}
        by_group[args.group] = result
        ends = [f.max_prompt_len for f in result.schedules.values() if f.max_prompt_len]
        top = max(ends, default=0)
        grid = {round(top * k / PLOT_POINTS) for k in range(PLOT_POINTS + 1)} | {top // 50}
        grid |= {e * k // 4 for e in ends if e < top // 8 for k in range(1, 4)}  # short lines
        prompts = sorted(p for p in {*grid, *ends, result.prompt_len} if p >= 2)
        by_prompt = {p: frontier(spec, group_size=args.group, prompt_len=p, **kwargs)
                     for p in prompts}  # fmt: skip
        title = (
            f"hbmplan frontier ESTIMATE: {spec.name}, {args.hbm / 2**30:.1f} GiB, "
            f"fsdp={args.fsdp} tp={args.tp}, S={args.response}, {args.rows} row(s)/microbatch, "
            f"{args.optimizer}" + (f"; times at {args.card} rates" if result.card else "")
        )
        _plot(args.plot, by_group, by_prompt, args.group, title)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def _join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--hbm -80GiB`` as ``--hbm=-80GiB``: argparse would take the value for an option and
    answer "expected one argument" instead of the option's own error."""
    out: list[str] = []
    for a in argv:
        if out and out[-1] in _NUMERIC_OPTIONS and re.match(r"-\.?[0-9]", a):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad input, one line on stderr)."""
    parser = _parser()
    try:
        args = parser.parse_args(_join_negative_values(sys.argv[1:] if argv is None else argv))
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
