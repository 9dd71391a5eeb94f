"""Executes the reuse schedule's plan at phase boundaries: the phase-hook protocol and its
participants (offload streaming and reload, recompute, the probe, byte metering, NVTX), the
saved-tensor capture they act through, and layer replay. The only client of
:mod:`hbmplan.allocator`."""

from __future__ import annotations

import torch

from hbmplan.config import ReuseConfig
from hbmplan.runtime.capture import SavedStorage, SavedTensorCapture
from hbmplan.runtime.metering import ByteMeter
from hbmplan.runtime.nvtx import NvtxRanges
from hbmplan.runtime.offload import Offload, OffloadReport
from hbmplan.runtime.participant import (
    GroupContext,
    MicrobatchContext,
    Participant,
    Participants,
    StepContext,
)
from hbmplan.runtime.planning import PromptPlanner
from hbmplan.runtime.probe import Probe
from hbmplan.runtime.recompute import Recompute
from hbmplan.runtime.stats import PhaseClock, PhaseStats, RouterStepStats, StepStats
from hbmplan.runtime.step_plan import GroupPlan, Microbatch, PhaseBAttention, StepPlan

__all__ = [
    "ByteMeter",
    "GroupContext",
    "GroupPlan",
    "Microbatch",
    "MicrobatchContext",
    "NvtxRanges",
    "Offload",
    "OffloadReport",
    "Participant",
    "Participants",
    "PhaseBAttention",
    "PhaseClock",
    "PhaseStats",
    "Probe",
    "PromptPlanner",
    "Recompute",
    "RouterStepStats",
    "SavedStorage",
    "SavedTensorCapture",
    "StepContext",
    "StepPlan",
    "StepStats",
    "offload_participants",
]


def offload_participants(
    device: torch.device, config: ReuseConfig
) -> tuple[PromptPlanner, Offload, list[Participant]]:
    """The participants that keep a step within ``config.hbm_budget`` on ``device``, in the
    order they must run: the probe, the planner, recompute and offload (empty when
    ``config.offloads`` is False). Returned with the planner and the offload participant, whose
    :meth:`Offload.close` gives the host pool back."""
    planner = PromptPlanner(config.hbm_budget, config.offload, config.rates)
    offload = Offload(planner, device)
    parts = [Probe(planner), planner, Recompute(planner), offload] if config.offloads else []
    return planner, offload, parts
