"""hbmplan: shared-prefix reuse and HBM planning for RL post-training on long shared prompts."""

from hbmplan import _moved, losses, models, schedules, token_filter
from hbmplan.capacity.frontier import FrontierConfig, FrontierResult, Shards, frontier
from hbmplan.config import ReuseConfig
from hbmplan.errors import BudgetError, HostMemoryError, ParallelLayoutError, PoolExhaustedError
from hbmplan.group import Group
from hbmplan.memory import MemoryContext, Report, memory

_moved.install()

__all__ = [
    "BudgetError",
    "FrontierConfig",
    "FrontierResult",
    "Group",
    "HostMemoryError",
    "MemoryContext",
    "ParallelLayoutError",
    "PoolExhaustedError",
    "Report",
    "ReuseConfig",
    "Shards",
    "frontier",
    "losses",
    "memory",
    "models",
    "schedules",
    "token_filter",
]
__version__ = "0.1.0"
