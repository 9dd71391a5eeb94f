"""Measure the capacity frontier on a GPU: per schedule, binary search on the prompt length P
until out-of-memory, with the reference decoder at Llama3-8B layer shapes; compare with the
estimate of ``hbmplan.frontier`` and write ``benchmarks/results/frontier_<card>_<yyyy-mm>.md``.

    python tools/frontier.py --measure [--layers 4] [--response 1024] [--time-limit 420]
    python tools/frontier.py            # the estimate only (no GPU needed)

Peaks do not depend on G with one response/trajectory per microbatch, so the search runs G=1
(``--group``). "dense+ckpt" wraps each layer in non-reentrant ``torch.utils.checkpoint``;
"reuse+offload" runs ``hbmplan.memory(model, budget, offload="auto")`` with the device's
activation budget (a ``BudgetError`` counts as not fitting).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hbmplan
from hbmplan.capacity.frontier import calibrate_scale, frontier
from hbmplan.capacity.presets import model_spec
from hbmplan.capacity.step_bytes import cuda_masked_gqa_fused, estimate_step, prompt_layer_bytes
from hbmplan.capacity.steptime import step_time
from hbmplan.models import DecoderConfig, ReferenceDecoder
from hbmplan.schedules import dense_step, reuse_step

GiB = 2**30
ROOT = Path(__file__).resolve().parents[1]
MEASURED = ("dense", "reuse", "reuse+offload", "dense+ckpt")
"""The schedules this script runs ("reuse+offload" as ``hbmplan.memory(offload="auto")``, which
may recompute as well)."""


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=True)
    except ImportError:
        return _Bar(total, desc)


class _Bar:
    """Minimal stand-in for tqdm: one line per update on stderr."""

    def __init__(self, total: int, desc: str) -> None:
        self.n, self.total, self.desc = 0, total, desc

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, s: str) -> None:
        print(f"{self.desc} [{self.n}/{self.total}] {s}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class _Checkpointed(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args):
        return torch.utils.checkpoint.checkpoint(self.layer, *args, use_reentrant=False)


@contextlib.contextmanager
def _checkpointing(model: ReferenceDecoder):
    originals = list(model.layers)
    for i, layer in enumerate(originals):
        model.layers[i] = _Checkpointed(layer)
    try:
        yield
    finally:
        for i, layer in enumerate(originals):
            model.layers[i] = layer


def _card_slug(name: str) -> str:
    m = re.search(r"(gb200|b200|h200|h100|h20|a100|a10g|l40s|l4|mi300x|mi250)", name.lower())
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _run(model: ReferenceDecoder, schedule: str, P: int, S: int, G: int, device, budget) -> dict:
    ids = torch.randint(0, model.cfg.vocab_size, (P + G * S,), device=device)
    group = hbmplan.Group(
        prompt=ids[:P], responses=[ids[P + i * S : P + (i + 1) * S] for i in range(G)]
    )

    def loss(lp, g, i):
        return -lp.sum()

    if schedule == "dense":
        stats = dense_step(model, [group], loss)
    elif schedule == "dense+ckpt":
        with _checkpointing(model):
            stats = dense_step(model, [group], loss)
    elif schedule == "reuse":
        stats = reuse_step(model, [group], loss)
    else:  # non-atomic: the gradients are preallocated and their values do not matter here
        with hbmplan.memory(model, budget, offload="auto", atomic=False) as mem:
            stats = mem.step([group], loss)
    torch.cuda.synchronize(device)
    return {k: v.peak_bytes for k, v in stats.phases.items()} | {"seconds": stats.seconds}


def _probe(model, schedule, P, S, G, device, budget) -> dict | None:
    """One step at prompt length P: its peaks, or ``None`` on out-of-memory (state cleaned)."""
    result = None
    try:
        result = _run(model, schedule, P, S, G, device, budget)
    except (torch.OutOfMemoryError, hbmplan.BudgetError) as exc:
        exc.__traceback__ = None  # the frames hold the failed step's tensors
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    return result


def _search(model, schedule, start, args, device, deadline, budget) -> dict:
    """Largest P (to within ``--step``) whose step runs; gallops from the estimate."""
    lo, hi, peaks = 0, args.max_prompt + 1, {}
    bar = _progress(total=2 * (args.max_prompt // args.step).bit_length() + 4, desc=schedule)
    n, grow = max(2, min(start, args.max_prompt)), True
    while hi - lo > args.step and time.monotonic() < deadline:
        r = _probe(model, schedule, n, args.response, args.group, device, budget)
        bar.update()
        bar.set_postfix_str(f"P={n:,} {'ok' if r else 'OOM'} bracket=[{lo:,}, {hi:,})")
        if r is not None:
            lo, peaks = n, r
        else:
            hi, grow = n, False
        if grow:  # no OOM seen yet: step up by 25%
            n = min(int(n * 1.25) + args.step, hi - 1)
            if n <= lo:
                break
        else:
            n = (lo + hi) // 2 if lo else max(2, hi // 2)
    bar.close()
    return {"max_prompt_len": lo, "oom_at": hi if hi <= args.max_prompt else None, "peaks": peaks,
            "capped": lo == args.max_prompt, "timed_out": time.monotonic() >= deadline}  # fmt: skip


def _markdown(res: dict) -> str:
    lines = [f"# Capacity frontier, measured: {res['card']}", "",
             f"{res['date']}, torch {res['torch']}, CUDA {res['cuda']}, {res['model']}, "
             f"S={res['response']}, G={res['group']}, bf16, static = params + grads "
             f"({res['static_bytes'] / GiB:.2f} GiB), device {res['device_bytes'] / GiB:.1f} GiB.",
             f"Masked GQA runs a fused CUDA kernel: {res['fused_gqa']}.", "",
             "## Calibration (one small step; bytes above parameters and gradients)", "",
             "| phase | measured | predicted | error |", "|---|---|---|---|"]  # fmt: skip
    cal = res["calibration"]
    for k, m in cal["measured"].items():
        p = cal["predicted"][k]
        lines.append(f"| {k} | {m:,} | {p:,} | {100 * (p - m) / m:+.1f}% |")
    lines += ["", f"Fitted scale: {cal['scale']:.4f}", "", "## Frontier", "",
              "| schedule | measured max P | P+S | OOM at | estimated max P | peak measured (GiB) "
              "| peak predicted (GiB) | error | s/step measured | s/step estimated (H200 rates) |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in res["schedules"].items():
        m, p = r.get("peak_measured"), r.get("peak_predicted")
        err = f"{100 * (p - m) / m:+.1f}%" if m and p else "-"
        lines.append(
            f"| {name} | {r['max_prompt_len']:,}{'+' if r['capped'] else ''}"
            f"{' (timed out)' if r['timed_out'] else ''} | {r['max_prompt_len'] + res['response']:,} | "
            f"{r['oom_at'] or '-'} | {r['estimated_max_prompt_len']:,} | "
            f"{(m or 0) / GiB:.2f} | {(p or 0) / GiB:.2f} | {err} | "
            f"{r['peaks'].get('seconds', 0):.3f} | {r.get('seconds_estimated', 0):.3f} |"
        )
    lines += ["", "s/step measured: the last fitting step of the search (one step, no warm-up; "
              "offload's includes planning and pinning the host pool). Estimated: "
              "`hbmplan.capacity.steptime.step_time`, the lowest plan of each schedule."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            rule = "an integer >= 1" if kind is int else "a number > 0"
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    return parse


def _schedules(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or any(n not in MEASURED for n in names):
        raise argparse.ArgumentTypeError(
            f"must be a comma-separated list from {', '.join(MEASURED)}, got {text!r}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--measure", action="store_true", help="measure on the GPU (needs CUDA)")
    ap.add_argument("--layers", type=_positive(int), default=4,
                    help="decoder layers of Llama3-8B shape")  # fmt: skip
    ap.add_argument("--response", type=_positive(int), default=1024, help="S, tokens per response")
    ap.add_argument("--group", type=_positive(int), default=1, help="G, responses per prompt")
    ap.add_argument("--schedules", type=_schedules, default=",".join(MEASURED),
                    help="the schedules to search (those this script can run)")  # fmt: skip
    ap.add_argument("--step", type=_positive(int), default=512,
                    help="search granularity in tokens")  # fmt: skip
    ap.add_argument("--max-prompt", type=_positive(int), default=262144,
                    help="upper end of the search")  # fmt: skip
    ap.add_argument("--time-limit", type=_positive(float), default=360.0,
                    help="seconds for all searches")  # fmt: skip
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                    help="where the .md and .json go")  # fmt: skip
    args = ap.parse_args(argv)
    cfg = DecoderConfig(vocab_size=32000, num_layers=args.layers, max_positions=1 << 21)
    schedules = args.schedules
    if not args.measure:
        print(frontier(cfg, "80GiB", args.group, args.response, schedules, optimizer="none"))
        return 0
    if not torch.cuda.is_available():
        print("tools/frontier.py --measure needs a CUDA device; none is visible", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.manual_seed(0)
    with device:  # initialise on the GPU: a CPU init of ~1B parameters takes a while
        model = ReferenceDecoder(cfg).to(dtype=torch.bfloat16)
    fused = cuda_masked_gqa_fused(device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    cal = calibrate_scale(model, 1024, 256, 1, fused_gqa=fused)
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    static = torch.cuda.memory_allocated(device)
    device_bytes = torch.cuda.get_device_properties(device).total_memory
    free, _ = torch.cuda.mem_get_info(device)
    budget = free + torch.cuda.memory_allocated(device)  # what the caching allocator can reach
    est = frontier(cfg, budget, args.group, args.response, schedules, optimizer="none",
                   fragmentation=0.0, fused_gqa=fused)  # fmt: skip
    end = time.monotonic() + args.time_limit
    spec, out = model_spec(cfg), {}
    for i, name in enumerate(schedules):  # each search gets an equal share of the time left
        deadline = time.monotonic() + (end - time.monotonic()) / (len(schedules) - i)
        start = est[name].max_prompt_len or 1024
        r = _search(model, name, start, args, device, deadline, budget - static)
        r["estimated_max_prompt_len"] = est[name].max_prompt_len
        if r["max_prompt_len"]:
            ph = estimate_step(spec, r["max_prompt_len"], [args.response] * args.group,
                               name, torch.bfloat16, target="cuda", fused_gqa=fused)  # fmt: skip
            r["peak_predicted"] = static + max(v.total for v in ph.values())
            r["peak_measured"] = max(v for k, v in r["peaks"].items() if k != "seconds")
            t = step_time(spec, r["max_prompt_len"], [args.response] * args.group, name,
                          layer_bytes=prompt_layer_bytes(spec, r["max_prompt_len"],
                                                         fused_gqa=fused))  # fmt: skip
            r["seconds_estimated"] = t.seconds
        out[name] = r
    now = datetime.datetime.now(datetime.timezone.utc)
    card = torch.cuda.get_device_name(device)
    res = {
        "card": card, "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "model": f"ReferenceDecoder {args.layers} layers, h=4096, 32/8 heads, ffn 14336, vocab 32000",
        "response": args.response, "group": args.group, "static_bytes": static,
        "device_bytes": device_bytes, "fused_gqa": fused,
        "calibration": {"scale": cal.scale, "measured": cal.measured, "predicted": cal.predicted,
                        "shape": cal.shape},
        "schedules": out,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"frontier_{_card_slug(card)}_{now:%Y-%m}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    stem.with_suffix(".md").write_text(_markdown(res))
    print(_markdown(res))
    print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
