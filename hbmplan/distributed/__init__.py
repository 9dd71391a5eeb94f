"""Training on several ranks: the reuse step under FSDP2 and DDP (:mod:`.data_parallel`), the
ranks' vote (:mod:`.agreement`), group placement (:mod:`.placement`), the global token count
(:mod:`.counting`)."""

from hbmplan.distributed.counting import global_token_count
from hbmplan.distributed.placement import Placement, assign

__all__ = ["Placement", "assign", "global_token_count"]
