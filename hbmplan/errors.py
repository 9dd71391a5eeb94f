"""Errors hbmplan raises for caller input it cannot honour (beyond plain ``ValueError``)."""

from __future__ import annotations

__all__ = ["BudgetError"]

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
