"""Lifetimes of saved tensors and plans for keeping, offloading or recomputing them."""

from hbmplan.errors import BudgetError
from hbmplan.runtime.capture import SavedStorage, SavedTensorCapture
from hbmplan.planner.lifetimes import Lifetime, classify
from hbmplan.planner.plan import Plan, PlanCache, PlanInputs, Rates, make_plan

__all__ = [
    "BudgetError",
    "Lifetime",
    "Plan",
    "PlanCache",
    "PlanInputs",
    "Rates",
    "SavedStorage",
    "SavedTensorCapture",
    "classify",
    "make_plan",
]
