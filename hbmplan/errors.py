"""Every error hbmplan raises for a request it cannot honour, beyond plain ``ValueError`` and
``TypeError`` for malformed input: a budget no plan fits, a host pool too small or too large."""

from __future__ import annotations

__all__ = [
    "BudgetError",
    "DataParallelError",
    "HostMemoryError",
    "ParallelLayoutError",
    "PoolExhaustedError",
    "RankFailureError",
]

_MIB = 2**20


class BudgetError(ValueError):
    """The HBM budget is smaller than the smallest budget any plan fits.

    Attributes:
        budget: the budget asked for, in bytes.
        min_feasible: the smallest budget, in bytes, for which a plan exists under the
            planner's model (every dormant tensor offloaded or recomputed, prefetch depth 1).
    """

    def __init__(self, budget: int, min_feasible: int, detail: str = "") -> None:
        self.budget = int(budget)
        self.min_feasible = int(min_feasible)
        self.detail = detail
        msg = (
            f"hbm_budget must be at least the smallest feasible budget {self.min_feasible} bytes "
            f"({self.min_feasible / _MIB:.1f} MiB), got {self.budget} bytes "
            f"({self.budget / _MIB:.1f} MiB)"
        )
        super().__init__(f"{msg}; {detail}" if detail else msg)

    def __reduce__(self):
        # The default reduce re-calls __init__ with the message only; keep the attributes.
        return (type(self), (self.budget, self.min_feasible, self.detail))


class HostMemoryError(MemoryError):
    """The host has too little free RAM for the requested pool (checked before allocating)."""

    def __init__(self, requested: int, available: int, margin: int):
        self.requested, self.available, self.margin = requested, available, margin
        super().__init__(
            f"host pool of {requested} bytes does not fit in host RAM: {available} bytes are "
            f"available and {margin} bytes are kept free as a margin, so at most "
            f"{max(available - margin, 0)} bytes can be pooled; offload less or free host memory"
        )

    def __reduce__(self):  # the default re-calls __init__ with the message only
        return (type(self), (self.requested, self.available, self.margin))


class PoolExhaustedError(MemoryError):
    """No free range of the host pool can hold the request, even after waiting on pending
    frees."""

    def __init__(self, requested: int, largest_free: int, capacity: int, used: int):
        self.requested, self.largest_free = requested, largest_free
        self.capacity, self.used = capacity, used
        super().__init__(
            f"host pool exhausted: requested {requested} bytes, largest free range is "
            f"{largest_free} bytes, {used} of {capacity} bytes (capacity) are in use"
        )

    def __reduce__(self):
        return (type(self), (self.requested, self.largest_free, self.capacity, self.used))


class ParallelLayoutError(ValueError):
    """A tensor- or context-parallel layout the reuse step cannot run exactly: K/V heads not
    divisible by the tensor-parallel degree, a per-head norm whose gradient would be a per-rank
    partial sum or be all-reduced after every backward, a prompt split that is not supported.
    The message names the module, the rule and the supported alternative."""


class DataParallelError(ValueError):
    """A data-parallel model or option hbmplan cannot run: a grouped ``fully_shard`` unit, an
    FSDP2 model whose root is not sharded, ``grad_sync="every-microbatch"`` under DDP."""


class RankFailureError(RuntimeError):
    """A data-parallel step failed on one or more ranks; every rank raises and restores its
    gradients (a failing rank raises its own error, with a note naming the ranks).

    Attributes:
        ranks: the failing ranks, ascending.
        errors: each failing rank's error, as ``"Type: message"``.
    """

    def __init__(self, errors: dict[int, str]) -> None:
        self.errors = dict(sorted(errors.items()))
        self.ranks = list(self.errors)
        detail = "; ".join(f"rank {r}: {e}" for r, e in self.errors.items())
        super().__init__(
            f"the step failed on rank(s) {self.ranks} ({detail}); every rank restored its "
            "gradients and the next step may run"
        )

    def __reduce__(self):
        return (type(self), (self.errors,))
