"""The capacity frontier: a byte model of a training step (:mod:`.step_bytes`), model presets,
calibration against a measured step, and the frontier search (:mod:`.frontier`).

The search itself is :func:`hbmplan.frontier`; this package does not re-export it, so that
``hbmplan.capacity.frontier`` always names the module.
"""

from hbmplan.capacity.frontier import (
    Calibration,
    FrontierResult,
    ScheduleFrontier,
    Shards,
    StaticMemory,
    calibrate_scale,
    static_memory,
)
from hbmplan.capacity.presets import PRESETS, ModelSpec, model_spec
from hbmplan.capacity.step_bytes import SCHEDULES, PhaseBytes, estimate_step

__all__ = [
    "PRESETS",
    "SCHEDULES",
    "Calibration",
    "FrontierResult",
    "ModelSpec",
    "PhaseBytes",
    "ScheduleFrontier",
    "Shards",
    "StaticMemory",
    "calibrate_scale",
    "estimate_step",
    "model_spec",
    "static_memory",
]
