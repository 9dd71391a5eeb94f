"""The pure centre of hbmplan: lifetimes of the prompt's saved tensors in, a plan out (keep,
offload or recompute each), from a timeline model. Imports nothing else of hbmplan but errors."""

from hbmplan.errors import BudgetError
from hbmplan.planner.lifetimes import Lifetime, rescale
from hbmplan.planner.plan import Plan, PlanCache, PlanInputs, make_plan, predict
from hbmplan.planner.timeline import Rates
from hbmplan.planner.working import layer_working_bytes, phase_b_working_bytes

__all__ = [
    "BudgetError",
    "Lifetime",
    "Plan",
    "PlanCache",
    "PlanInputs",
    "Rates",
    "layer_working_bytes",
    "make_plan",
    "phase_b_working_bytes",
    "predict",
    "rescale",
]

_MOVED = {
    "SavedStorage": "hbmplan.runtime.capture",
    "SavedTensorCapture": "hbmplan.runtime.capture",
    "classify": "hbmplan.runtime.planning",
}


def __getattr__(name: str):
    """Names that moved to :mod:`hbmplan.runtime` (the capture executes plans; it is not part of
    planning): still importable from here for one release, with a ``DeprecationWarning``."""
    if name not in _MOVED:
        raise AttributeError(f"module 'hbmplan.planner' has no attribute {name!r}")
    import importlib
    import warnings

    warnings.warn(
        f"hbmplan.planner.{name} moved to {_MOVED[name]}.{name}; the old name goes in the next "
        "release",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(_MOVED[name]), name)
