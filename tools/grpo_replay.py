"""Replay a recorded GRPO trace with the dense and reuse schedules in lockstep, check the
differences against docs/design.md's rules, and write the report (``python tools/grpo_trace.py
replay``; see that module for the CLI).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hbmplan
from hbmplan.losses import PolicyLoss
from hbmplan.schedules import dense_step
from tools.grpo_record import (
    JSON_NAME,
    Trace,
    TraceError,
    TrainConfig,
    clip_and_norm,
    group_from,
    make_optimizer,
    policy_loss,
    progress,
    record,
)
from tools.grpo_task import ModelSpec, TaskConfig, build_model

FP32_TARGET = 1e-5  # issue 7: max relative parameter difference at the last step, fp32
FACTOR = 2.0  # docs/design.md tolerance rule: |x - ref| <= 2 |x_dense - ref| (atol 0)
TAGS = {"float32": "fp32", "bfloat16": "bf16", "float64": "fp64"}
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class RunSpec:
    """One replay of the trace."""

    schedule: Literal["dense", "reuse"]
    """``dense_step`` (one row per microbatch) or ``hbmplan.memory(...).step``."""
    dtype: str
    """"float32", "bfloat16" (bf16 compute, fp32 master weights and AdamW state) or "float64"
    (the reference of docs/design.md's tolerance rule for the fp32 runs)."""
    offload: Literal["off", "all"] = "off"
    """The reuse schedule's offload mode."""

    @property
    def name(self) -> str:
        plus = "+offload" if self.offload == "all" else ""
        return f"{self.schedule}{plus}-{TAGS[self.dtype]}"


class Run:
    """A model, its optimizer and its per-step losses and gradient norms."""

    def __init__(self, spec: RunSpec, model: nn.Module, train: TrainConfig, tokens: int) -> None:
        self.spec, self.train = spec, train
        self.names = [n for n, _ in model.named_parameters()]
        self.master = [p.detach().float().clone() for p in model.parameters()]
        self.model = model.to(getattr(torch, spec.dtype))
        self.params = list(self.model.parameters())
        self.mixed = spec.dtype == "bfloat16"
        self.opt = make_optimizer(self.master if self.mixed else self.params, train)
        self.mem = None
        if spec.schedule == "reuse":
            self.mem = hbmplan.memory(
                self.model, offload=spec.offload, tokens_per_microbatch=tokens
            )
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def step(self, groups: list[hbmplan.Group], loss_fn: PolicyLoss) -> None:
        self.model.zero_grad(set_to_none=True)
        if self.mem is not None:
            stats = self.mem.step(groups, loss_fn)
        else:
            stats = dense_step(self.model, groups, loss_fn)
        if self.mixed:
            for m, p in zip(self.master, self.params, strict=True):
                m.grad = None if p.grad is None else p.grad.float()
        self.grad_norms.append(clip_and_norm(self.trained, self.train.max_grad_norm))
        self.opt.step()
        if self.mixed:
            with torch.no_grad():
                for m, p in zip(self.master, self.params, strict=True):
                    p.copy_(m)
        self.losses.append(float(stats.loss))

    @property
    def trained(self) -> list[torch.Tensor]:
        """What the optimizer updates: the fp32 master weights for bf16, else the parameters."""
        return self.master if self.mixed else self.params

    @property
    def offloaded_bytes(self) -> int:
        """Bytes the offload engine moved to host over the whole replay (0: none)."""
        last = self.mem.report().last if self.mem is not None else None
        off = last.offload if last is not None else None
        return off.engine.bytes_offloaded if off is not None and off.engine is not None else 0

    def state(self) -> dict[str, torch.Tensor]:
        """Parameters by name: the optimizer's copy (fp32 master weights for bf16)."""
        return dict(zip(self.names, (p.detach() for p in self.trained), strict=True))


def fresh_model(trace: Trace) -> nn.Module:
    """The fp32 model built from the trace's config and seed, checked against its stored init."""
    model = build_model(trace.model_spec, trace.task, trace.train.seed)
    got = {n: tuple(p.shape) for n, p in model.named_parameters()}
    want = {k[5:]: tuple(v.shape) for k, v in trace.tensors.items() if k.startswith("init/")}
    for name in sorted(got.keys() | want.keys()):
        if got.get(name) != want.get(name):
            raise TraceError(
                f"model config in {JSON_NAME} does not match the stored parameters: {name} has "
                f"shape {want.get(name)} in the trace, {got.get(name)} from the config"
            )
    with torch.no_grad():
        for n, p in model.named_parameters():
            init = trace.tensors[f"init/{n}"]
            if not torch.equal(p, init):  # another torch release may draw another init
                p.copy_(init)
    return model


def run_specs(dtypes: list[str], offloads: list[str]) -> list[RunSpec]:
    """dense-fp32 (the reference of every comparison) and, for fp32, dense-fp64 (the tolerance
    rule's reference), then the runs ``dtypes`` x ``offloads`` ask for."""
    specs = [RunSpec("dense", "float32")]
    if "float32" in dtypes:
        specs.append(RunSpec("dense", "float64"))
    for dt in DTYPES:
        if dt in dtypes:
            specs += [RunSpec("dense", dt)] if dt != "float32" else []
            specs += [RunSpec("reuse", dt, off) for off in ("off", "all") if off in offloads]
    return specs


def comparisons(names: list[str]) -> list[tuple[str, str, str, str]]:
    """(label, run, reference run, "rel" | "abs") for every difference the replay tracks."""
    pairs = []
    for tag in ("fp32", "bf16"):
        for r in (f"reuse-{tag}", f"reuse+offload-{tag}"):
            if r in names:
                pairs.append((f"{r} vs dense-{tag}", r, f"dense-{tag}", "rel"))
        a, b = f"reuse+offload-{tag}", f"reuse-{tag}"
        if a in names and b in names:
            pairs.append((f"{a} vs {b} (max abs)", a, b, "abs"))
    for ref, runs in (("dense-fp64", ("dense-fp32", "reuse-fp32")),
                      ("dense-fp32", ("dense-bf16", "reuse-bf16", "reuse+offload-bf16"))):  # fmt: skip
        pairs += [(f"{r} vs {ref}", r, ref, "rel") for r in runs if r in names and ref in names]
    return pairs


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over parameters of max|a - b| / max|b| (b is the reference)."""
    worst = 0.0
    for n, ref in b.items():
        diff = (a[n].double() - ref.double()).abs().max().item()
        scale = ref.abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return worst


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n].double() - b[n].double()).abs().max().item() for n in b)


class Lockstep:
    """The runs of :func:`run_specs`, stepped together on the same groups, and the per-step
    differences of :func:`comparisons`. A context manager (it holds the reuse runs' memory
    contexts). ``external`` names a run computed elsewhere whose parameters :meth:`step` is
    given instead: ``"dense-fp32"`` when the recording itself is that run (``record --replay``)."""

    def __init__(
        self,
        make_model: Callable[[], nn.Module],
        train: TrainConfig,
        dtypes: list[str],
        offloads: list[str],
        tokens_per_microbatch: int,
        external: str | None = None,
    ) -> None:
        specs = run_specs(dtypes, offloads)
        assert external is None or external in [s.name for s in specs], external
        self.runs = [Run(spec, make_model(), train, tokens_per_microbatch)
                     for spec in specs if spec.name != external]  # fmt: skip
        self.by_name = {r.spec.name: r for r in self.runs}
        self.external = external
        self.pairs = comparisons([s.name for s in specs])
        self.diffs: dict[str, list[float]] = {label: [] for label, *_ in self.pairs}
        self.loss_fn = policy_loss(train)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Lockstep:
        for r in self.runs:
            if r.mem is not None:
                self._stack.enter_context(r.mem)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def step(self, groups: list[hbmplan.Group], external: nn.Module | None = None) -> None:
        """One optimizer step of every run on ``groups``, then the differences; ``external``
        is the external run's model after its own step on the same groups."""
        if (external is None) != (self.external is None):
            raise ValueError(f"step() needs the model of the external run {self.external!r}")
        for r in self.runs:
            r.step(groups, self.loss_fn)

        def state(name: str) -> dict[str, torch.Tensor]:
            if name == self.external:
                return {n: p.detach() for n, p in external.named_parameters()}
            return self.by_name[name].state()

        for label, a, b, kind in self.pairs:
            fn = max_rel_diff if kind == "rel" else max_abs_diff
            self.diffs[label].append(fn(state(a), state(b)))

    def runs_result(self) -> dict[str, dict]:
        """Per run: losses, gradient norms and bytes offloaded (the external run is not here)."""
        return {name: {"loss": r.losses, "grad_norm": r.grad_norms,
                       "offloaded_bytes": r.offloaded_bytes}
                for name, r in self.by_name.items()}  # fmt: skip

    def postfix(self) -> str:
        d = self.diffs.get("reuse-fp32 vs dense-fp32")
        return f"reuse-fp32 vs dense-fp32 {d[-1]:.1e}" if d else ""


def replay(
    trace: Trace,
    dtypes: list[str],
    offloads: list[str],
    tokens_per_microbatch: int,
    steps: int | None = None,
    show: bool = True,
) -> dict:
    """Replay ``trace`` with every run in lockstep; per-step losses, norms and differences.
    ``tokens_per_microbatch`` is the reuse schedule's packing budget."""
    train, task = trace.train, trace.task
    steps = min(steps or train.steps, len(trace.meta["steps"]))
    for j in {j for s in trace.meta["steps"][:steps] for j in s["groups"]}:
        try:
            group = group_from(trace.tensors, j)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TraceError(f"group {j} of the trace is malformed: {err}") from None
        ids = torch.cat([group.prompt, *group.responses])
        if int(ids.max()) >= task.vocab_size or int(ids.min()) < 0:
            raise TraceError(f"group {j} holds token ids outside the vocabulary {task.vocab_size}")
    lock = Lockstep(lambda: fresh_model(trace), train, dtypes, offloads, tokens_per_microbatch)
    with lock, progress(steps, "replay", show) as bar:
        for step in range(steps):
            lock.step(trace.groups(step))
            bar.set_postfix_str(lock.postfix())
            bar.update(1)
    dense = lock.by_name["dense-fp32"]
    recorded = trace.meta["steps"][:steps]
    final = {k[6:]: v for k, v in trace.tensors.items() if k.startswith("final/")}
    return {
        "steps": steps,
        "runs": lock.runs_result(),
        "diffs": lock.diffs,
        "replay_vs_record_loss": max(
            abs(a - s["loss"]) for a, s in zip(dense.losses, recorded, strict=True)
        ),
        "replay_vs_record_params": (
            max_rel_diff(dense.state(), final) if steps == len(trace.meta["steps"]) else None
        ),
        "reward_mean": [s["reward_mean"] for s in recorded],
        "clip_fraction": [s["clip_fraction"] for s in recorded],
    }


def record_and_replay(
    out: Path,
    task: TaskConfig,
    spec: ModelSpec,
    train: TrainConfig,
    dtypes: list[str],
    offloads: list[str],
    tokens_per_microbatch: int,
    show: bool = True,
) -> tuple[Trace, dict]:
    """:func:`tools.grpo_record.record` with the replay's other runs stepped in lockstep after
    each recorded step: the recording is the replay's dense-fp32 run (the replay of a trace
    recomputes that run bit for bit on the same machine and threads), so one dense fp32 run
    fewer. Returns the trace and the result :func:`replay` would give."""
    lock = Lockstep(lambda: build_model(spec, task, train.seed), train, dtypes, offloads,
                    tokens_per_microbatch, external="dense-fp32")  # fmt: skip
    with lock:
        trace = record(out, task, spec, train, show, on_step=lambda g, m: lock.step(g, m))
    recorded = trace.meta["steps"]
    dense = {"loss": [s["loss"] for s in recorded],
             "grad_norm": [s["grad_norm"] for s in recorded], "offloaded_bytes": 0}  # fmt: skip
    return trace, {
        "steps": len(recorded),
        "runs": {"dense-fp32": dense, **lock.runs_result()},
        "diffs": lock.diffs,
        "replay_vs_record_loss": None,  # the recording is the dense-fp32 run
        "replay_vs_record_params": None,
        "reward_mean": [s["reward_mean"] for s in recorded],
        "clip_fraction": [s["clip_fraction"] for s in recorded],
    }


# -- report ------------------------------------------------------------------------------------
def checks(result: dict) -> list[dict]:
    """Issue 7's targets and docs/design.md's tolerance rule (``ok`` True/False), at the last step
    unless said, then what is measured but not judged (``ok`` None)."""
    d, n, out = result["diffs"], result["steps"], []

    def add(check: str, value: float, ok: bool | None) -> None:
        out.append({"check": check, "value": value, "ok": None if ok is None else bool(ok)})

    def rule(run: str, dense: str, ref: str) -> None:
        if f"{run} vs {ref}" in d and f"{dense} vs {ref}" in d:
            v, floor = d[f"{run} vs {ref}"][-1], d[f"{dense} vs {ref}"][-1]
            add(f"{run} vs {ref} / {dense} vs {ref}, step {n} <= {FACTOR:g}",
                v / floor if floor > 0 else float("inf"), v <= FACTOR * floor)  # fmt: skip

    for r in ("reuse-fp32", "reuse+offload-fp32"):
        if f"{r} vs dense-fp32" in d:
            v = d[f"{r} vs dense-fp32"][-1]
            add(f"{r} vs dense-fp32 at step {n} <= {FP32_TARGET:g}", v, v <= FP32_TARGET)
    rule("reuse-fp32", "dense-fp32", "dense-fp64")
    for tag in ("fp32", "bf16"):
        label = f"reuse+offload-{tag} vs reuse-{tag} (max abs)"
        if label in d:
            add(f"reuse+offload-{tag} bitwise equal to reuse-{tag} at every step", max(d[label]),
                max(d[label]) == 0.0)  # fmt: skip
    rule("reuse-bf16", "dense-bf16", "dense-fp32")
    rule("reuse+offload-bf16", "dense-bf16", "dense-fp32")
    if "dense-fp32 vs dense-fp64" in d:
        add(f"fp32 accuracy: dense-fp32 vs dense-fp64 at step {n}",
            d["dense-fp32 vs dense-fp64"][-1], None)  # fmt: skip
    if result["replay_vs_record_params"] is not None:
        add("dense-fp32 replay vs recorded final parameters (0: bitwise)",
            result["replay_vs_record_params"], None)  # fmt: skip
    return out


def _record_line(result: dict) -> str:
    if result["replay_vs_record_loss"] is None:
        return "dense-fp32 is the recording itself (record --replay: replayed while recording)"
    return (f"dense-fp32 replay vs the recorded per-step loss: max abs difference "
            f"{result['replay_vs_record_loss']:.3g}")  # fmt: skip


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def summary(verdicts: list[dict]) -> str:
    verdict = {True: "pass", False: "FAIL", None: "info"}
    rows = [[c["check"], f"{c['value']:.3g}", verdict[c["ok"]]] for c in verdicts]
    return _table(["check", "measured", ""], rows)


def write_report(out: Path, name: str, result: dict, verdicts: list[dict]) -> list[Path]:
    """``name``.md (environment, checks, per-step table), ``name``.json and ``name``.png."""
    out.mkdir(parents=True, exist_ok=True)
    n, runs, d = result["steps"], result["runs"], result["diffs"]
    shown = [r for r in ("dense-fp32", "reuse-fp32", "dense-bf16", "reuse-bf16") if r in runs]
    header = ["step", "reward", "clip frac", *[f"loss {r}" for r in shown]]
    header += [f"grad norm {r}" for r in shown] + list(d)
    rows = [[str(k + 1), f"{result['reward_mean'][k]:.3f}", f"{result['clip_fraction'][k]:.3f}"]
            + [f"{runs[r]['loss'][k]:+.6e}" for r in shown]
            + [f"{runs[r]['grad_norm'][k]:.6e}" for r in shown]
            + [f"{d[c][k]:.2e}" for c in d] for k in sorted({0, n - 1, *range(9, n, 10)})]  # fmt: skip
    env, cfg = result["environment"], result["trace"]
    rec = {"command": "?", "machine": "?", "torch": "?"} | cfg["environment"]
    offloaded = {r: v["offloaded_bytes"] for r, v in runs.items() if v["offloaded_bytes"]}
    md = out / f"{name}.md"
    md.write_text(
        f"# GRPO trace replay: dense trainer vs reuse schedule\n\n"
        f"- machine: {env['machine']}\n- torch: {env['torch']}\n- date: {env['date']}\n"
        f"- command: `{env['command']}`\n- trace recorded with: `{rec['command']}` "
        f"({rec['machine']}, torch {rec['torch']})\n"
        f"- trace: model {cfg['model']}; task {cfg['task']}; train {cfg['train']}\n"
        f"- runs: {', '.join(runs)}; reuse tokens_per_microbatch {result['tokens_per_microbatch']}"
        f"; bf16 runs compute in bf16 with fp32 master weights and AdamW state\n"
        f"- bytes offloaded over the replay: {offloaded}\n"
        f"- {_record_line(result)}\n\n## Checks\n\n{summary(verdicts)}\n\n"
        f"`a / b <= 2` rows are docs/design.md's tolerance rule, |x - ref| <= 2 |x_dense - ref|.\n\n"
        f"## Per step\n\nParameter differences: max over parameters of max|a - b| / max|b|, b "
        f"the reference run; `(max abs)`: max|a - b|, 0 means bitwise equal.\n\n"
        f"{_table(header, rows)}\n"
    )
    js = out / f"{name}.json"
    js.write_text(json.dumps({**result, "checks": verdicts}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("grpo_trace: matplotlib is not installed, no plot written", file=sys.stderr)
        return [md, js]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    x = range(1, n + 1)
    style = {"reuse-fp32 vs dense-fp32": ("C0", "-"), "dense-fp32 vs dense-fp64": ("C2", "-"),
             "reuse-fp32 vs dense-fp64": ("C2", "--"), "dense-bf16 vs dense-fp32": ("C3", "-"),
             "reuse-bf16 vs dense-fp32": ("C3", "--")}  # fmt: skip
    for label, (color, ls) in style.items():
        if label in d:
            ax.semilogy(x, d[label], color=color, ls=ls, lw=1.4, label=label)
    ax.axhline(FP32_TARGET, color="gray", ls=":", lw=1, label=f"fp32 target {FP32_TARGET:g}")
    same = [lab.split(" vs ")[0] for lab in d if lab.endswith("(max abs)") and max(d[lab]) == 0]
    if same:
        ax.text(0.02, 0.02, f"{', '.join(same)}: bitwise equal to no offload at every step",
                transform=ax.transAxes, fontsize=8)  # fmt: skip
    ax.set(xlabel="step", ylabel="max relative parameter difference",
           title="Parameter difference per step")  # fmt: skip
    ax.legend(fontsize=8, loc="center right")
    for r in shown:
        ls = "--" if r.startswith("reuse") else "-"
        ax2.plot(x, runs[r]["loss"], ls=ls, lw=1, label=f"loss {r}")
    ax2.set(xlabel="step", ylabel="policy loss", title="Loss per step; mean reward of the trace")
    twin = ax2.twinx()
    twin.plot(x, result["reward_mean"], color="black", ls=":", lw=1, label="mean reward")
    twin.set_ylabel("mean reward")
    ax2.legend(fontsize=8, loc="upper left")
    twin.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    png = out / f"{name}.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [md, js, png]
