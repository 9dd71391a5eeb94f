"""Training schedules: the dense baseline and the shared-prefix reuse schedule (a short driver
over phases A, B and C; see :mod:`hbmplan.schedules.reuse`)."""

from hbmplan.runtime.stats import PhaseStats, StepStats
from hbmplan.schedules.dense import dense_step
from hbmplan.schedules.reuse import reuse_step, run_step
from hbmplan.schedules.score import score_groups

__all__ = ["PhaseStats", "StepStats", "dense_step", "reuse_step", "run_step", "score_groups"]
