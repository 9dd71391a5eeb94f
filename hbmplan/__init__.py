"""hbmplan: shared-prefix reuse and HBM planning for RL post-training on long shared prompts."""

from hbmplan import losses, models, schedules
from hbmplan.errors import BudgetError
from hbmplan.group import Group
from hbmplan.memory import MemoryContext, Report, memory
from hbmplan.capacity.frontier import FrontierResult, Shards, frontier

__all__ = [
    "BudgetError",
    "FrontierResult",
    "Group",
    "MemoryContext",
    "Report",
    "Shards",
    "frontier",
    "losses",
    "memory",
    "models",
    "schedules",
]
__version__ = "0.1.0"
