"""Estimates from a model's shapes (:class:`ModelSpec`, presets): the byte model of a training
step (:mod:`.layer_bytes`, :mod:`.step_bytes`), FLOP counts and step times (:mod:`.flops`,
:mod:`.steptime`), static memory, calibration against a measured step, and the frontier search
(:mod:`.frontier`, :class:`FrontierConfig`).

The search itself is :func:`hbmplan.frontier`; this package does not re-export it, so that
``hbmplan.capacity.frontier`` always names the module.
"""

from hbmplan.capacity.calibration import Calibration, calibrate_scale
from hbmplan.capacity.frontier import FrontierConfig
from hbmplan.capacity.presets import PRESETS, ModelSpec, model_spec
from hbmplan.capacity.result import FrontierResult, ScheduleFrontier
from hbmplan.capacity.static import Shards, StaticMemory, static_memory
from hbmplan.capacity.step_bytes import SCHEDULES, PhaseBytes, estimate_step
from hbmplan.capacity.steptime import CARDS, Card, StepTime, step_time

__all__ = [
    "CARDS",
    "PRESETS",
    "SCHEDULES",
    "Calibration",
    "Card",
    "FrontierConfig",
    "FrontierResult",
    "ModelSpec",
    "PhaseBytes",
    "ScheduleFrontier",
    "Shards",
    "StaticMemory",
    "StepTime",
    "calibrate_scale",
    "estimate_step",
    "model_spec",
    "static_memory",
    "step_time",
]
