"""Policy losses usable directly as an hbmplan loss_fn."""
