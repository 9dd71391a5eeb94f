"""Training on several ranks: the reuse step under FSDP2 and DDP (:mod:`.data_parallel`), the
ranks' vote (:mod:`.agreement`), group placement (:mod:`.placement`), the global token count
(:mod:`.counting`), the dense baseline under both engines (:mod:`.dense`); tensor parallel
(:mod:`.tensor_parallel`) and context parallel (:mod:`.context_parallel`,
:mod:`.cp_attention`)."""

from hbmplan.distributed.counting import global_token_count
from hbmplan.distributed.dense import dense_step
from hbmplan.distributed.placement import Placement, assign

__all__ = ["Placement", "assign", "dense_step", "global_token_count"]
