"""What :class:`hbmplan.integrations.trl.ReuseGRPOTrainer` trains exactly as TRL does, and the
refusal of everything else, before any model is loaded. Reads a ``GRPOConfig``'s attributes;
imports nothing of TRL, so it can be tested without it.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "LOSS_TYPES",
    "TRL_VERSIONS",
    "check_args",
    "check_trl_version",
    "exact_batches",
    "unsupported",
]

TRL_VERSIONS = (">=1.16", "<1.17")
"""The TRL releases whose ``GRPOTrainer`` internals (``_compute_loss``, ``_prepare_inputs``,
``_get_per_token_logps_and_entropies``) the trainer reproduces; pinned in the ``trl`` extra."""

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
"""``GRPOConfig.loss_type`` values trained exactly (the clipped token-level objective with each
of TRL's normalisations)."""


def _release(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise ImportError(f"cannot read the TRL version {version!r}")
    return int(m.group(1)), int(m.group(2))


def check_trl_version(version: str) -> None:
    """``ImportError`` unless ``version`` is a supported TRL release (:data:`TRL_VERSIONS`)."""
    if _release(version) != (1, 16):
        raise ImportError(
            f"hbmplan.integrations.trl supports TRL {','.join(TRL_VERSIONS)} (it reproduces "
            f"GRPOTrainer's loss internals exactly, release by release), got trl {version}: "
            "pip install 'hbmplan[trl]' or 'trl>=1.16,<1.17'"
        )


def unsupported(args: Any) -> list[str]:
    """The options of a ``GRPOConfig`` the reuse schedule cannot train exactly as TRL does, each
    as ``"option=value: why"``; empty when every option is supported."""
    bad = []

    def refuse(name: str, why: str) -> None:
        bad.append(f"{name}={getattr(args, name)!r}: {why}")

    if args.loss_type not in LOSS_TYPES:
        refuse("loss_type", f"supported: {', '.join(LOSS_TYPES)}")
    if args.importance_sampling_level != "token":
        refuse("importance_sampling_level", "sequence-level ratios are not reproduced; use 'token'")
    if args.top_entropy_quantile < 1.0:
        refuse("top_entropy_quantile", "the entropy mask needs a global quantile; use 1.0")
    if args.entropy_coef != 0.0:
        refuse("entropy_coef", "an entropy bonus needs entropy gradients; use 0.0")
    if args.use_adaptive_entropy:
        refuse("use_adaptive_entropy", "an entropy bonus needs entropy gradients; use False")
    if args.off_policy_mask_threshold is not None:
        refuse("off_policy_mask_threshold", "off-policy sequence masking is not reproduced")
    if args.cast_lm_head_to_fp32:
        refuse("cast_lm_head_to_fp32", "the LM head runs in the model's dtype")
    if args.fp16:
        refuse("fp16", "the loss scaler would not scale hbmplan's backward; use bf16")
    if getattr(args, "use_liger_kernel", False):
        refuse("use_liger_kernel", "Liger's layer kernels are not verified on the reuse schedule")
    if getattr(args, "deepspeed", None):
        refuse("deepspeed", "the trainer drives DDP only; use trl.GRPOTrainer")
    if getattr(args, "fsdp", None):
        refuse(
            "fsdp",
            "the trainer drives DDP only (for FSDP2 use hbmplan.memory directly); "
            "use trl.GRPOTrainer",
        )
    generation_rows = args.per_device_train_batch_size * args.steps_per_generation
    if generation_rows % args.num_generations:
        bad.append(
            f"per_device_train_batch_size x steps_per_generation = {generation_rows} must be a "
            f"multiple of num_generations={args.num_generations}: a group (one prompt, its "
            "generations) must stay on one process"
        )
    elif not exact_batches(args) and args.per_device_train_batch_size % args.num_generations:
        bad.append(
            f"per_device_train_batch_size={args.per_device_train_batch_size} must be a multiple of "
            f"num_generations={args.num_generations} when steps_per_generation="
            f"{args.steps_per_generation} does not divide gradient_accumulation_steps="
            f"{args.gradient_accumulation_steps}: whole groups then go to optimizer steps"
        )
    return bad


def check_args(args: Any) -> None:
    """``ValueError`` naming every option in :func:`unsupported`."""
    bad = unsupported(args)
    if bad:
        raise ValueError(
            "ReuseGRPOTrainer trains exactly what trl.GRPOTrainer trains, and cannot for these "
            "GRPOConfig options (use trl.GRPOTrainer for them): " + "; ".join(bad)
        )


def exact_batches(args: Any) -> bool:
    """Whether each generation batch is trained within one optimizer step
    (``steps_per_generation`` divides ``gradient_accumulation_steps``; TRL's default): rows are
    then regrouped by prompt and keep the weights TRL's shuffle gave them, so the update is
    TRL's. Otherwise whole groups go to micro-batches (and so to optimizer steps)."""
    return args.gradient_accumulation_steps % args.steps_per_generation == 0
