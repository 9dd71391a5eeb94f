"""Record a GRPO run with the dense trainer, then replay it with the reuse schedule step for step.

    python tools/grpo_trace.py record --out DIR [--steps 100 --group 8 --prompt-len 512
                                                 --model reference|qwen3 --seed 0 ...]
    python tools/grpo_trace.py replay --trace DIR [--dtype float32 bfloat16] [--offload off all]
                                                  [--out DIR --name STEM]

``record`` trains a small random-init model (hbmplan's reference decoder or a tiny Hugging Face
Qwen3 built from a config) on the synthetic task of ``tools/grpo_task.py``: G responses sampled
from the model itself, rewards from the checker, group-normalised advantages, ``PolicyLoss``
(old log-probs from the sampling policy; each batch serves ``--updates-per-batch`` optimizer
steps, so the ratio leaves 1 and the clip is exercised), ``dense_step``, gradient clipping,
AdamW. The trace is ``trace.json`` + ``trace.safetensors`` (never pickle).

``replay`` reruns the trace from the same init with ``dense_step`` and ``hbmplan.memory(...).step``
(offload "off" and "all") in fp32 and bf16 (bf16 compute, fp32 master weights and AdamW state),
plus a dense fp64 run as the reference of DESIGN.md's tolerance rule, all in lockstep. It checks
fp32 reuse against fp32 dense (<= 1e-5 relative at the last step), offload against no offload
(bitwise) and the tolerance rule (fp32 vs fp64; bf16 vs the fp32 dense run), and writes
``STEM.md`` (table), ``STEM.json`` and ``STEM.png`` (difference curves). Exit status: 0 when every
check passes, 1 when one fails, 2 for bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hbmplan
from hbmplan.losses import PolicyLoss, group_advantages
from hbmplan.schedules import dense_step
from tools.grpo_task import ModelSpec, TaskConfig, build_model, make_problem, reward, sample_group

FORMAT = "hbmplan-grpo-trace"
VERSION = 1
JSON_NAME, TENSORS_NAME = "trace.json", "trace.safetensors"


class TraceError(ValueError):
    """Bad input to the CLI: a path, a trace file or an option. Printed on one line, exit 2."""


@dataclass(frozen=True)
class TrainConfig:
    """GRPO optimisation settings."""

    steps: int = 100
    """Optimizer steps."""
    group: int = 8
    """Responses sampled per prompt, G."""
    prompts_per_step: int = 1
    """Groups (prompts) per step; the loss is averaged over them."""
    updates_per_batch: int = 2
    """Optimizer steps per sampled batch; above 1 the later ones are off-policy (ratio != 1)."""
    lr: float = 1e-3
    """AdamW learning rate. At 2e-3 the default run turns sensitive after ~80 steps (many
    clipped tokens, fast reward growth): every fp32 summation order, the dense trainer's own
    included, then drifts past 1e-5 by step 100."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-6
    """AdamW epsilon. Not torch's 1e-8: Adam divides each entry's gradient by its own running
    magnitude, so an entry a millionth of its tensor's largest, whose fp32 rounding error is
    relatively large, still moves by ~lr. On the default run (benchmarks/results/grpo_trace_cpu_*)
    dense-fp32 ends 9e-4 (relative) from dense-fp64 and reuse-fp32 2e-4 from dense-fp32 with
    1e-8; 1.4e-5 and 3e-6 with 1e-6."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip (0: no clipping; the norm is still reported)."""
    clip_eps_low: float = 0.2
    """PolicyLoss lower ratio clip."""
    clip_eps_high: float = 0.28
    """PolicyLoss upper ratio clip (clip-higher)."""
    temperature: float = 1.0
    """Sampling temperature; old log-probs are untempered, exact behaviour log-probs at 1."""
    seed: int = 0
    """Seeds the init (seed), the task (seed + 1) and sampling (seed + 2)."""

    def __post_init__(self) -> None:
        for name in ("steps", "group", "prompts_per_step", "updates_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.temperature <= 0 or self.max_grad_norm < 0:
            raise ValueError(
                f"lr and temperature must be > 0 and max_grad_norm >= 0, got lr={self.lr}, "
                f"temperature={self.temperature}, max_grad_norm={self.max_grad_norm}"
            )


@dataclass
class Trace:
    """A recorded run: ``meta`` is trace.json, ``tensors`` is trace.safetensors."""

    meta: dict
    tensors: dict[str, torch.Tensor] = field(repr=False)

    @property
    def task(self) -> TaskConfig:
        return TaskConfig(**{**self.meta["task"], "ops": tuple(self.meta["task"]["ops"])})

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec(**self.meta["model"])

    @property
    def train(self) -> TrainConfig:
        return TrainConfig(**{**self.meta["train"], "betas": tuple(self.meta["train"]["betas"])})

    def groups(self, step: int) -> list[hbmplan.Group]:
        """The groups optimizer step ``step`` trains on."""
        return [group_from(self.tensors, j) for j in self.meta["steps"][step]["groups"]]


def group_from(tensors: dict[str, torch.Tensor], j: int) -> hbmplan.Group:
    """Group ``j`` of a trace: prompt, responses, advantages [G] and old log-probs [S_i]."""
    lens = tensors[f"group/{j}/response_lens"].tolist()
    return hbmplan.Group(
        prompt=tensors[f"group/{j}/prompt"],
        responses=list(tensors[f"group/{j}/responses"].split(lens)),
        data={
            "advantages": tensors[f"group/{j}/advantages"],
            "old_logprobs": list(tensors[f"group/{j}/old_logprobs"].split(lens)),
        },
    )


def policy_loss(train: TrainConfig) -> PolicyLoss:
    return PolicyLoss(
        clip_eps_low=train.clip_eps_low,
        clip_eps_high=train.clip_eps_high,
        aggregation="token-mean",
        scale=1.0 / train.prompts_per_step,
    )


def make_optimizer(params, train: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        params, lr=train.lr, betas=train.betas, eps=train.adam_eps, weight_decay=train.weight_decay
    )


def clip_and_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Global L2 gradient norm before clipping; clips to ``max_norm`` unless it is 0."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm)


class ClipMeter:
    """Wraps a PolicyLoss and counts tokens whose clipped branch zeroes the gradient."""

    def __init__(self, loss: PolicyLoss) -> None:
        self.loss, self.clipped, self.tokens, self.max_log_ratio = loss, 0, 0, 0.0

    def __call__(self, logprobs: torch.Tensor, group: hbmplan.Group, i: int) -> torch.Tensor:
        log_ratio = logprobs.detach() - group.data["old_logprobs"][i].to(logprobs.dtype)
        self.max_log_ratio = max(self.max_log_ratio, float(log_ratio.abs().max()))
        ratio, adv = torch.exp(log_ratio), float(group.data["advantages"][i])
        if adv > 0:
            self.clipped += int((ratio > 1 + self.loss.clip_eps_high).sum())
        elif adv < 0:
            self.clipped += int((ratio < 1 - self.loss.clip_eps_low).sum())
        self.tokens += logprobs.numel()
        return self.loss(logprobs, group, i)


class _Bar:
    """Progress on one stderr line when tqdm is not installed (or a silent one)."""

    def __init__(self, total: int, desc: str, disable: bool) -> None:
        self.total, self.desc, self.disable, self.n, self.postfix = total, desc, disable, 0, ""

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable:
            print(f"\r{self.desc}: {self.n}/{self.total} {self.postfix}", end="", file=sys.stderr)

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def close(self) -> None:
        if not self.disable:
            print(file=sys.stderr)


@contextlib.contextmanager
def progress(total: int, desc: str, enabled: bool):
    """A tqdm bar when tqdm is importable, else :class:`_Bar`; closed on exit."""
    bar = None
    if enabled:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            pass
    bar = bar or _Bar(total, desc, disable=not enabled)
    try:
        yield bar
    finally:
        bar.close()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def environment() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "machine": f"{cpu}, {torch.get_num_threads()} threads" + (f", {gpu}" if gpu else ""),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
    }


# -- trace files -------------------------------------------------------------------------------
def save_trace(out: Path, trace: Trace) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in trace.tensors.items()}
    save_file(tensors, out / TENSORS_NAME, metadata={"format": FORMAT, "version": str(VERSION)})
    (out / JSON_NAME).write_text(json.dumps(trace.meta, indent=1))


def load_trace(path: Path) -> Trace:
    """Read and validate a trace directory; every problem is a one-line :class:`TraceError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise TraceError(f"trace directory does not exist: {path}")
    if not path.is_dir():
        raise TraceError(f"--trace must be a directory holding {JSON_NAME}, got a file: {path}")
    for name in (JSON_NAME, TENSORS_NAME):
        if not (path / name).is_file():
            raise TraceError(f"{path} is not a trace directory: {name} is missing")
    try:
        meta = json.loads((path / JSON_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TraceError(f"{path / JSON_NAME} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise TraceError(f"{path / JSON_NAME} is not a {FORMAT!r} file, got format {got!r}")
    if meta.get("version") != VERSION:
        raise TraceError(
            f"trace version must be {VERSION} for this tool, got {meta.get('version')!r}"
        )
    try:
        tensors = load_file(path / TENSORS_NAME)
    except (SafetensorError, OSError) as err:
        raise TraceError(f"{path / TENSORS_NAME} cannot be read: {err}") from None
    trace = Trace(meta, tensors)
    try:
        trace.task, trace.model_spec, trace.train  # noqa: B018 - parse and validate
        needed = {
            f"group/{j}/{k}"
            for s in meta["steps"]
            for j in s["groups"]
            for k in ("prompt", "responses", "response_lens", "advantages", "old_logprobs")
        }
    except (KeyError, TypeError, ValueError) as err:
        raise TraceError(f"{path / JSON_NAME} holds an invalid configuration: {err}") from None
    missing = sorted(needed - tensors.keys())
    if missing:
        raise TraceError(f"{path / TENSORS_NAME} lacks {len(missing)} tensors, e.g. {missing[0]}")
    return trace


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise TraceError(f"--out must be a directory, got a file: {out}")
    if (out / JSON_NAME).exists() and not force:
        raise TraceError(f"{out} already holds a trace; pass --force to overwrite it")


# -- record ------------------------------------------------------------------------------------
def record(
    out: Path, task: TaskConfig, spec: ModelSpec, train: TrainConfig, show: bool = True
) -> Trace:
    """Run GRPO with the dense trainer and return (and save to ``out``) its trace."""
    model = build_model(spec, task, train.seed)
    tensors = {f"init/{n}": p for n, p in _state(model).items()}
    params = list(model.parameters())
    opt = make_optimizer(params, train)
    gen_task = torch.Generator().manual_seed(train.seed + 1)
    gen_sample = torch.Generator().manual_seed(train.seed + 2)
    loss_fn = policy_loss(train)
    groups_meta, steps_meta, batch = [], [], []
    with progress(train.steps, "record", show) as bar:
        for step in range(train.steps):
            if step % train.updates_per_batch == 0:
                batch = []
                for _ in range(train.prompts_per_step):
                    problem = make_problem(task, gen_task)
                    responses, old = sample_group(
                        model,
                        problem.prompt,
                        train.group,
                        task.max_new_tokens,
                        train.temperature,
                        gen_sample,
                    )
                    rewards = torch.tensor([reward(r.tolist(), problem.answer) for r in responses])
                    j = len(groups_meta)
                    tensors |= {
                        f"group/{j}/prompt": problem.prompt,
                        f"group/{j}/responses": torch.cat(responses),
                        f"group/{j}/response_lens": torch.tensor([r.numel() for r in responses]),
                        f"group/{j}/rewards": rewards.float(),
                        f"group/{j}/advantages": group_advantages(rewards.float()),
                        f"group/{j}/old_logprobs": torch.cat(old),
                    }
                    groups_meta.append(
                        {
                            "op": problem.op,
                            "answer": list(problem.answer),
                            "rewards": rewards.tolist(),
                        }
                    )
                    batch.append(j)
            meter = ClipMeter(loss_fn)
            model.zero_grad(set_to_none=True)
            stats = dense_step(model, [group_from(tensors, j) for j in batch], meter)
            norm = clip_and_norm(params, train.max_grad_norm)
            opt.step()
            mean_reward = sum(sum(groups_meta[j]["rewards"]) for j in batch) / (
                len(batch) * train.group
            )
            steps_meta.append(
                {
                    "groups": list(batch),
                    "loss": float(stats.loss),
                    "grad_norm": norm,
                    "reward_mean": mean_reward,
                    "clip_fraction": meter.clipped / meter.tokens,
                    "max_abs_log_ratio": meter.max_log_ratio,
                }
            )
            bar.set_postfix_str(f"reward {mean_reward:.3f} loss {float(stats.loss):+.4f}")
            bar.update(1)
    tensors |= {f"final/{n}": p for n, p in _state(model).items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "task": asdict(task),
        "model": asdict(spec),
        "train": asdict(train),
        "vocab_size": task.vocab_size,
        "threads": torch.get_num_threads(),
        "environment": environment(),
        "groups": groups_meta,
        "steps": steps_meta,
    }
    trace = Trace(meta, tensors)
    save_trace(out, trace)
    return trace


# -- replay ------------------------------------------------------------------------------------
FP32_TARGET = 1e-5  # issue 7: max relative parameter difference at the last step, fp32
FACTOR = 2.0  # DESIGN.md tolerance rule: |x - ref| <= 2 |x_dense - ref| (atol 0)
TAGS = {"float32": "fp32", "bfloat16": "bf16", "float64": "fp64"}
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class RunSpec:
    """One replay of the trace."""

    schedule: Literal["dense", "reuse"]
    """``dense_step`` (one row per microbatch) or ``hbmplan.memory(...).step``."""
    dtype: str
    """"float32", "bfloat16" (bf16 compute, fp32 master weights and AdamW state) or "float64"
    (the reference of DESIGN.md's tolerance rule for the fp32 runs)."""
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
    runs = [Run(spec, fresh_model(trace), train, tokens_per_microbatch)
            for spec in run_specs(dtypes, offloads)]  # fmt: skip
    by_name = {r.spec.name: r for r in runs}
    pairs = comparisons(list(by_name))
    diffs: dict[str, list[float]] = {label: [] for label, *_ in pairs}
    loss_fn = policy_loss(train)
    with contextlib.ExitStack() as stack, progress(steps, "replay", show) as bar:
        for r in runs:
            if r.mem is not None:
                stack.enter_context(r.mem)
        for step in range(steps):
            groups = trace.groups(step)
            for r in runs:
                r.step(groups, loss_fn)
            for label, a, b, kind in pairs:
                fn = max_rel_diff if kind == "rel" else max_abs_diff
                diffs[label].append(fn(by_name[a].state(), by_name[b].state()))
            if "reuse-fp32 vs dense-fp32" in diffs:
                bar.set_postfix_str(
                    f"reuse-fp32 vs dense-fp32 {diffs['reuse-fp32 vs dense-fp32'][-1]:.1e}"
                )
            bar.update(1)
    dense = by_name["dense-fp32"]
    recorded = trace.meta["steps"][:steps]
    final = {k[6:]: v for k, v in trace.tensors.items() if k.startswith("final/")}
    return {
        "steps": steps,
        "runs": {
            name: {
                "loss": r.losses,
                "grad_norm": r.grad_norms,
                "offloaded_bytes": r.offloaded_bytes,
            }
            for name, r in by_name.items()
        },
        "diffs": diffs,
        "replay_vs_record_loss": max(
            abs(a - s["loss"]) for a, s in zip(dense.losses, recorded, strict=True)
        ),
        "replay_vs_record_params": (
            max_rel_diff(dense.state(), final) if steps == len(trace.meta["steps"]) else None
        ),
        "reward_mean": [s["reward_mean"] for s in recorded],
        "clip_fraction": [s["clip_fraction"] for s in recorded],
    }


# -- report ------------------------------------------------------------------------------------
def checks(result: dict) -> list[dict]:
    """Issue 7's targets and DESIGN.md's tolerance rule (``ok`` True/False), at the last step
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
        f"- dense-fp32 replay vs the recorded per-step loss: max abs difference "
        f"{result['replay_vs_record_loss']:.3g}\n\n## Checks\n\n{summary(verdicts)}\n\n"
        f"`a / b <= 2` rows are DESIGN.md's tolerance rule, |x - ref| <= 2 |x_dense - ref|.\n\n"
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


# -- CLI ---------------------------------------------------------------------------------------
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
    rep = sub.add_parser("replay", help="replay a trace with the dense and reuse schedules")
    rep.add_argument("--trace", type=Path, required=True, help="directory written by record")
    rep.add_argument("--dtype", nargs="+", choices=DTYPES, default=list(DTYPES),
                     help="float32 adds a dense-fp64 reference run")  # fmt: skip
    rep.add_argument("--offload", nargs="+", choices=["off", "all"], default=["off", "all"])
    rep.add_argument("--tokens-per-microbatch", type=int, default=None,
                     help="reuse packing budget (default: 4 x max response length)")  # fmt: skip
    rep.add_argument("--steps", type=int, default=None, help="replay only the first N steps")
    rep.add_argument("--out", type=Path, default=None, help="default: the trace directory")
    rep.add_argument("--name", default="replay", help="file stem of the .md/.json/.png")
    for p in (rec, rep):
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
    _check_out(args.out, args.force)
    trace = record(args.out, task, spec, train, not args.no_progress)
    rewards = [s["reward_mean"] for s in trace.meta["steps"]]
    k = max(1, len(rewards) // 10)
    print(f"recorded {len(rewards)} steps to {args.out}: mean reward {sum(rewards[:k]) / k:.3f} "
          f"over the first {k}, {sum(rewards[-k:]) / k:.3f} over the last {k}")  # fmt: skip
    return 0


def _replay(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    out = args.out or args.trace
    if out.exists() and not out.is_dir():
        raise TraceError(f"--out must be a directory, got a file: {out}")
    for flag in ("steps", "tokens_per_microbatch"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise TraceError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.threads is None and isinstance(trace.meta.get("threads"), int):
        torch.set_num_threads(trace.meta["threads"])  # the record's summation order
    tpm = args.tokens_per_microbatch or 4 * trace.task.max_new_tokens
    result = replay(trace, args.dtype, args.offload, tpm, args.steps, not args.no_progress)
    result |= {"environment": environment(), "tokens_per_microbatch": tpm,
               "trace": {k: trace.meta.get(k, {}) for k in ("task", "model", "train", "environment")}}  # fmt: skip
    verdicts = checks(result)
    paths = write_report(out, args.name, result, verdicts)
    print(summary(verdicts))
    print("written: " + ", ".join(str(p) for p in paths))
    return 1 if any(c["ok"] is False for c in verdicts) else 0


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
