"""Training on several ranks: tensor parallel (:mod:`.tensor_parallel`) and context parallel
(:mod:`.context_parallel`, :mod:`.cp_attention`)."""
