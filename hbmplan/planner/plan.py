"""Plans: keep, offload or recompute each dormant saved tensor of the prompt under an HBM budget.

``make_plan`` fits the budget with the least exposed time predicted by the timeline model in
:mod:`hbmplan.planner.timeline`; ``PlanCache`` reuses a plan while the shapes repeat.
"""

from __future__ import annotations

import itertools
import json
import numbers
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from hbmplan.errors import BudgetError
from hbmplan.planner.lifetimes import Lifetime
from hbmplan.planner.timeline import Layout, Prediction, Rates, Stage, StageModel

__all__ = [
    "BudgetError",
    "Decision",
    "Plan",
    "PlanCache",
    "PlanInputs",
    "Prediction",
    "Rates",
    "make_plan",
    "predict",
]

Decision = Literal["keep", "offload", "recompute"]
_MIB = 2**20


def _nonneg_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
        raise ValueError(f"{name} must be an int >= 0 (bytes), got {v!r}")
    return int(v)


@dataclass(frozen=True)
class PlanInputs:
    """What a plan is made from. Bytes are device bytes of the schedule's activations only:
    parameters, gradients and optimizer state live outside ``budget``."""

    lifetimes: Sequence[Lifetime]
    """Saved storages of the prompt forward (phase A), from ``classify``."""
    budget: int | None = None
    """Device bytes the schedule's activations may occupy at any time in A, B and C (hot and kept
    lifetimes, gradient cache, in-flight copies, prefetch window, working sets). ``None``: no
    limit (mode "auto" keeps everything)."""
    hot_extra_bytes: int = 0
    """Hot bytes born in phase B: the gradient cache (gK/gV), on the device through B and C."""
    b_working_bytes: int = 0
    """Phase B working set: activations of the largest response microbatch."""
    c_working_bytes: int = 0
    """Phase C working set: transient memory of one layer's backward (and recompute)."""
    a_working_bytes: int = 0
    """Phase A working set: transient memory of one layer's forward."""
    rates: Rates = field(default_factory=Rates)
    """Link and compute rates (defaults: H200 measurements and byte-based estimates)."""
    offload: bool = True
    """Whether dormant tensors may be offloaded to host memory."""
    recompute: bool = True
    """Whether a layer may recompute its forward in phase C instead of keeping its tensors."""
    mode: Literal["auto", "all"] = "auto"
    """"auto": the least exposed time within the budget. "all": offload every dormant tensor."""
    replayable: Mapping[int, frozenset[int]] | None = None
    """Which layers the schedule can replay: per layer, the lifetime ids its replay rebuilds
    (all it saves but its checkpoint, the first). A layer stage may recompute only when the
    replay rebuilds all its dormant lifetimes but its first, which is kept or offloaded.
    ``None``: every layer stage with two or more dormant lifetimes may."""

    def __post_init__(self) -> None:
        lts = tuple(sorted(self.lifetimes, key=lambda lt: lt.id))
        if len({lt.id for lt in lts}) != len(lts):
            raise ValueError("lifetime ids must be unique")
        for lt in lts:
            _nonneg_int(f"lifetime {lt.id} nbytes", lt.nbytes)
        object.__setattr__(self, "lifetimes", lts)
        for name in ("hot_extra_bytes", "a_working_bytes", "b_working_bytes", "c_working_bytes"):
            _nonneg_int(name, getattr(self, name))
        if self.budget is not None and (
            isinstance(self.budget, bool) or not isinstance(self.budget, numbers.Integral)
        ):
            raise TypeError(f"budget must be an int (bytes) or None, got {self.budget!r}")
        if self.mode not in ("auto", "all"):
            raise ValueError(f'mode must be "auto" or "all", got {self.mode!r}')
        if self.mode == "all" and not self.offload:
            raise ValueError('mode "all" offloads every dormant tensor; it needs offload=True')


@dataclass(frozen=True)
class Plan:
    """Decisions for one shape of the schedule, with what the timeline model predicts."""

    decisions: dict[int, Decision]
    """Lifetime id -> "keep" | "offload" | "recompute" (hot lifetimes: always "keep")."""
    prefetch_depth: int
    """Phase C: reloads run up to this many layers ahead of the backward (0: nothing offloaded)."""
    offload_lag: int
    """Phase A: a layer's forward waits until the offloads of layers more than this many before
    it are complete, bounding in-flight copies (0: nothing offloaded)."""
    peak_a_bytes: int
    """Predicted peak device bytes of phase A (the prompt forward)."""
    peak_b_bytes: int
    """Predicted peak device bytes of phase B (the response microbatches)."""
    peak_c_bytes: int
    """Predicted peak device bytes of phase C (the prompt backward)."""
    exposed_ab_s: float
    """Predicted offload time not hidden by phase A+B compute."""
    exposed_c_s: float
    """Predicted reload time not hidden by phase C compute, plus recompute time."""
    keep_bytes: int
    """Bytes kept on the device, hot included."""
    offload_bytes: int
    """Bytes copied to the host in A+B and back in C."""
    recompute_bytes: int
    """Bytes dropped in A and rebuilt by recomputing their layer's forward in C."""
    budget: int | None
    """The budget planned for, bytes (``None``: unlimited)."""
    min_feasible: int
    """Smallest budget any plan fits under the model (see ``make_plan``)."""
    mode: Literal["auto", "all"] = "auto"
    """The mode planned in."""

    @property
    def exposed_s(self) -> float:
        """Predicted exposed (non-overlapped) seconds of the whole step."""
        return self.exposed_ab_s + self.exposed_c_s

    @property
    def peak_bytes(self) -> int:
        return max(self.peak_a_bytes, self.peak_b_bytes, self.peak_c_bytes)

    def to_json(self) -> str:
        d = asdict(self)
        d["decisions"] = {str(k): v for k, v in sorted(self.decisions.items())}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        d["decisions"] = {int(k): v for k, v in d["decisions"].items()}
        bad = {v for v in d["decisions"].values() if v not in get_args(Decision)}
        if bad:
            raise ValueError(f"decisions must be one of {get_args(Decision)}, got {sorted(bad)}")
        return cls(**d)

    def __str__(self) -> str:
        counts = {k: 0 for k in get_args(Decision)}
        for v in self.decisions.values():
            counts[v] += 1
        nbytes = {"keep": self.keep_bytes, "offload": self.offload_bytes}
        nbytes["recompute"] = self.recompute_bytes
        budget = "none" if self.budget is None else f"{self.budget / _MIB:.1f} MiB"
        lines = [
            f"hbmplan plan ({self.mode}): budget {budget}, smallest feasible "
            f"{self.min_feasible / _MIB:.1f} MiB",
            f"  {'decision':<10}{'tensors':>9}{'MiB':>12}",
            *(f"  {k:<10}{counts[k]:>9}{nbytes[k] / _MIB:>12.1f}" for k in counts),
            f"  offload lag {self.offload_lag}, prefetch depth {self.prefetch_depth} layer(s)",
            f"  peak MiB: A {self.peak_a_bytes / _MIB:.1f}  B {self.peak_b_bytes / _MIB:.1f}"
            f"  C {self.peak_c_bytes / _MIB:.1f}",
            f"  exposed {self.exposed_s * 1e3:.3f} ms (A+B offload {self.exposed_ab_s * 1e3:.3f},"
            f" C reload+recompute {self.exposed_c_s * 1e3:.3f})",
        ]
        return "\n".join(lines)


def _model(inputs: PlanInputs) -> StageModel:
    working = (inputs.a_working_bytes, inputs.b_working_bytes, inputs.c_working_bytes)
    return StageModel(
        inputs.lifetimes, inputs.rates, inputs.hot_extra_bytes, working, inputs.replayable
    )


class _Line:
    """Plans that offload a growing prefix of one order, with one recompute set; memoized."""

    def __init__(self, model: StageModel, order: list[tuple[int, int, int]], rec: list[bool]):
        self.model, self.order, self.rec = model, order, rec
        self._pairs = [(k, b) for k, b, _ in order]
        self._lay: dict[int, Layout] = {}
        self._ab: dict[tuple[int, int], float] = {}
        self._c: dict[tuple[int, int], float] = {}

    def layout(self, x: int) -> Layout:
        if x not in self._lay:
            self._lay[x] = self.model.layout(self._pairs[:x], self.rec)
        return self._lay[x]

    def shortest(
        self, fits: Callable[[tuple[int, int, int]], bool], lag: int, depth: int
    ) -> int | None:
        """Smallest prefix whose peaks (A, B, C) satisfy ``fits``; ``None`` if none does.
        Peaks only shrink as the prefix grows (offloaded bytes leave the device sooner)."""
        lo, hi = 0, len(self.order)
        if not fits(self.model.peaks(self.layout(hi), lag, depth)):
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            ok = fits(self.model.peaks(self.layout(mid), lag, depth))
            lo, hi = (lo, mid) if ok else (mid + 1, hi)
        return lo

    def exposed(self, x: int, lag: int, depth: int) -> float:
        if (x, lag) not in self._ab:
            self._ab[x, lag] = self.model.exposed_ab(self.layout(x), lag)
        if (x, depth) not in self._c:
            self._c[x, depth] = self.model.exposed_c(self.layout(x), depth)
        return self._ab[x, lag] + self._c[x, depth]


def predict(
    inputs: PlanInputs, decisions: Mapping[int, Decision], lag: int, depth: int
) -> Prediction:
    """What the timeline model predicts for ``decisions`` (lifetime id -> decision; missing ids
    keep) with offload lag ``lag`` and prefetch depth ``depth``. A recomputed layer recomputes
    all its dormant tensors but its first (the checkpoint: kept or offloaded); hot tensors keep."""
    model = _model(inputs)
    hot = {lt.id for lt in inputs.lifetimes if lt.hot}
    unknown = set(decisions) - {lt.id for lt in inputs.lifetimes}
    if unknown:
        raise ValueError(f"decisions name lifetimes that are not in the inputs: {sorted(unknown)}")
    for i, d in decisions.items():
        if d not in get_args(Decision):
            raise ValueError(f"decision for lifetime {i} must be keep/offload/recompute, got {d!r}")
        if i in hot and d != "keep":
            raise ValueError(f"lifetime {i} is hot (read in phase B); it must keep, got {d!r}")
    rec, offloaded = [], []
    for k, s in enumerate(model.stages):
        marks = [decisions.get(i, "keep") == "recompute" for i, _ in s.dormant]
        if any(marks) and not (s.recomputable and not marks[0] and all(marks[1:])):
            raise ValueError(
                f"a recompute covers a whole layer but its checkpoint (first dormant tensor): "
                f"layer {s.layer}, lifetimes {[i for i, _ in s.dormant]}, recompute {marks}"
            )
        rec.append(any(marks))
        offloaded += [(k, b) for i, b in s.dormant if decisions.get(i) == "offload"]
    if offloaded and (lag < 1 or depth < 1):
        raise ValueError(f"offloading needs lag >= 1 and depth >= 1, got {lag} and {depth}")
    return model.predict(model.layout(offloaded, rec), lag, depth)


def _levels(n: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, ... below n, and n: the lags and depths the search tries."""
    out, p = {n}, 1
    while p < n:
        out.update(x for x in (p, p + p // 2) if x < n)
        p *= 2
    return sorted(x for x in out if x >= 1)


def _orders(stages: Sequence[Stage], rec: Sequence[bool]) -> list[list[tuple[int, int, int]]]:
    """Offload orders of (stage, nbytes, id): layer by layer from the first (its reload hides
    best); and spread (the largest tensor of every layer, then the next largest, ...: copies
    keep pace with compute at a small lag). A recomputed layer offers only its checkpoint."""
    ranked = []
    for k, s in enumerate(stages):
        items = sorted(s.dormant[:1] if rec[k] else s.dormant, key=lambda ib: (-ib[1], ib[0]))
        ranked += [(k, r, i, b) for r, (i, b) in enumerate(items)]
    by_layer = sorted(ranked)
    spread = sorted(ranked, key=lambda x: (x[1], x[0]))
    return [[(k, b, i) for k, _, i, b in order] for order in (by_layer, spread)]


def make_plan(inputs: PlanInputs) -> Plan:
    """The plan with the least predicted exposed time whose predicted peaks fit ``budget``.

    Candidates are fixed by the shapes and rates: recompute the top ``r`` recomputable layers
    (every ``r``), offload a prefix of one of the ``_orders``, with each offload lag and
    prefetch depth in ``_levels``. For each (r, order, lag, depth) the shortest prefix
    that fits is taken: peaks shrink and exposed time grows with the prefix, so a larger budget
    never raises the chosen exposed time. Ties go to fewer bytes moved, then recomputed.

    Raises ``BudgetError`` when ``budget`` is below the peak of the lowest plan: every dormant
    tensor offloaded (or recomputed, when allowed; mode "all": offloaded) with lag 1 and depth 1.
    At every point of the model any other plan holds at least the bytes that one holds.
    """
    model = _model(inputs)
    stages, n, budget = model.stages, model.n, inputs.budget
    if inputs.mode == "all":
        lowest_r = 0
    else:
        lowest_r = sum(s.recomputable for s in stages) if inputs.recompute else 0
    rec = model.recompute_flags(lowest_r)
    lowest_off = [(k, b) for k, b, _ in _orders(stages, rec)[0]] if inputs.offload else []
    min_feasible = model.predict(model.layout(lowest_off, rec), 1, 1).peak_bytes
    if budget is not None and budget < min_feasible:
        detail = (
            f"{len(lowest_off)} tensor(s) offloaded and {sum(rec)} layer(s) recomputed, "
            f"offload lag 1, prefetch depth 1, still peak at {min_feasible} bytes"
        )
        raise BudgetError(budget, min_feasible, detail)
    limit = float("inf") if budget is None else budget
    lines: list[tuple[tuple[int, int], _Line]] = []
    if inputs.mode == "all":
        every = [(k, b, i) for k, s in enumerate(stages) for i, b in s.dormant]
        lines.append(((0, 0), _Line(model, every, model.recompute_flags(0))))
    elif budget is None:
        lines.append(((0, 0), _Line(model, [], model.recompute_flags(0))))
    elif not inputs.offload:
        lines += [((r, 0), _Line(model, [], model.recompute_flags(r))) for r in range(lowest_r + 1)]
    else:
        for r in range(lowest_r + 1):
            rec = model.recompute_flags(r)
            lines += [
                ((r, o), _Line(model, order, rec)) for o, order in enumerate(_orders(stages, rec))
            ]
    best: tuple | None = None
    for (r, o), line in lines:
        levels = _levels(n) if line.order else [0]
        first = len(line.order) if inputs.mode == "all" else 0
        x_ab = {lag: line.shortest(lambda p: max(p[:2]) <= limit, lag, 1) for lag in levels}
        x_c = {d: line.shortest(lambda p: p[2] <= limit, 1, d) for d in levels}
        for lag, depth in itertools.product(levels, levels):
            if x_ab[lag] is None or x_c[depth] is None:
                continue
            x = max(first, x_ab[lag], x_c[depth])
            moved = sum(b for _, b, _ in line.order[:x])
            key = (line.exposed(x, lag, depth), moved, sum(line.layout(x)[2]), r, o, lag, depth)
            if best is None or key < best[0]:
                best = (key, line, x, lag, depth)
    assert best is not None, "the lowest plan fits every budget >= min_feasible"
    _, line, x, lag, depth = best
    p = model.predict(line.layout(x), lag, depth)
    ids, rec = {i for _, _, i in line.order[:x]}, line.rec
    decisions: dict[int, Decision] = {lt.id: "keep" for lt in inputs.lifetimes}
    for k, s in enumerate(stages):
        for j, (i, _) in enumerate(s.dormant):
            decisions[i] = "offload" if i in ids else "recompute" if rec[k] and j else "keep"
    nb = {lt.id: lt.nbytes for lt in inputs.lifetimes}
    total = {d: sum(nb[i] for i, v in decisions.items() if v == d) for d in get_args(Decision)}
    return Plan(
        decisions=decisions,
        prefetch_depth=depth if ids else 0,
        offload_lag=lag if ids else 0,
        peak_a_bytes=p.peak_a_bytes,
        peak_b_bytes=p.peak_b_bytes,
        peak_c_bytes=p.peak_c_bytes,
        exposed_ab_s=p.exposed_ab_s,
        exposed_c_s=p.exposed_c_s,
        keep_bytes=total["keep"],
        offload_bytes=total["offload"],
        recompute_bytes=total["recompute"],
        budget=budget,
        min_feasible=min_feasible,
        mode=inputs.mode,
    )


class PlanCache:
    """Least-recently-used plans by key, at most ``maxsize``: the one plan cache.

    :meth:`plan` keys by the shape signature of :class:`PlanInputs`: identical shapes (and
    budget, mode, actions) reuse a plan, new shapes replan. Rates are not part of the key: a
    plan made from the first step's timings is kept while shapes repeat; ``clear()`` to replan
    with new rates. :meth:`get`/:meth:`put` serve callers that know a plan before they have its
    inputs (the runtime keys by a step's shapes, before phase A has captured anything).
    """

    def __init__(self, maxsize: int = 16) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._plans: OrderedDict[Hashable, Any] = OrderedDict()

    @staticmethod
    def signature(inputs: PlanInputs) -> tuple:
        """(id, layer, nbytes, hot) per lifetime in capture order, plus every byte count and
        setting of ``inputs`` except the rates."""
        return (
            tuple((lt.id, lt.layer, lt.nbytes, lt.hot) for lt in inputs.lifetimes),
            inputs.budget,
            inputs.hot_extra_bytes,
            inputs.a_working_bytes,
            inputs.b_working_bytes,
            inputs.c_working_bytes,
            inputs.offload,
            inputs.recompute,
            inputs.mode,
            None
            if inputs.replayable is None
            else tuple(sorted((k, tuple(sorted(v))) for k, v in inputs.replayable.items())),
        )

    def get(self, key: Hashable) -> Any | None:
        """The entry stored under ``key`` (now the most recently used), or ``None``."""
        if key in self._plans:
            self.hits += 1
            self._plans.move_to_end(key)
            return self._plans[key]
        self.misses += 1
        return None

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value`` under ``key``, dropping the least recently used beyond ``maxsize``."""
        self._plans[key] = value
        self._plans.move_to_end(key)
        while len(self._plans) > self.maxsize:
            self._plans.popitem(last=False)

    def pop(self, key: Hashable) -> None:
        """Forget ``key`` (no error when absent)."""
        self._plans.pop(key, None)

    def plan(self, inputs: PlanInputs) -> Plan:
        """The cached plan for these shapes, or a new one (``make_plan``; errors propagate)."""
        key = self.signature(inputs)
        plan = self.get(key)
        if plan is None:
            plan = make_plan(inputs)
            self.put(key, plan)
        return plan

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)
