"""Training on several ranks: the reuse step under FSDP2 and DDP (:mod:`.data_parallel`), the
ranks' vote (:mod:`.agreement`), group placement (:mod:`.placement`)."""
