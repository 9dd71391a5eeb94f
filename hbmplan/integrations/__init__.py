"""Trainers of other libraries on the reuse schedule, each an optional import of its own:
``hbmplan.integrations.trl`` (extra ``trl``). ``import hbmplan`` imports none of them."""
