"""Record a GRPO run with the dense trainer: the trace format, its reader and writer, and the
training loop of ``python tools/grpo_trace.py record`` (see that module for the CLI).

The trace is ``trace.json`` (settings, environment, per-step metadata) + ``trace.safetensors``
(every group's token ids, advantages and old log-probs); never pickle.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

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


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise TraceError(f"--out must be a directory, got a file: {out}")
    if (out / JSON_NAME).exists() and not force:
        raise TraceError(f"{out} already holds a trace; pass --force to overwrite it")


# -- record ------------------------------------------------------------------------------------
def record(
    out: Path,
    task: TaskConfig,
    spec: ModelSpec,
    train: TrainConfig,
    show: bool = True,
    on_step: Callable[[list[hbmplan.Group], nn.Module], None] | None = None,
) -> Trace:
    """Run GRPO with the dense trainer and return (and save to ``out``) its trace.

    ``on_step(groups, model)``, if given, is called after each optimizer step with the step's
    groups and the model just updated (``record --replay`` steps the replay's runs there)."""
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
            groups = [group_from(tensors, j) for j in batch]
            stats = dense_step(model, groups, meter)
            norm = clip_and_norm(params, train.max_grad_norm)
            opt.step()
            if on_step is not None:
                on_step(groups, model)
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
