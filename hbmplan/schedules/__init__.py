"""Training schedules: the dense baseline and the shared-prefix reuse schedule."""

from hbmplan.schedules.dense import dense_step
from hbmplan.schedules.reuse import reuse_step
from hbmplan.runtime.stats import PhaseStats, StepStats

__all__ = ["PhaseStats", "StepStats", "dense_step", "reuse_step"]
