"""``ReuseGRPOTrainer``: TRL's ``GRPOTrainer`` with every prompt group trained on the reuse
schedule (prompt forward once, the completions as microbatches over its K/V, prompt backward
once). Change one import; the config, reward functions and dataset stay as they are.

What it changes in TRL 1.16, and nothing else:

* ``_prepare_inputs``: TRL's shuffle of the generation batch is kept (same random draw), then
  its rows are regrouped so that each micro-batch holds whole prompt groups
  (:func:`~hbmplan.integrations.trl_batches.regroup`), each row keeping the loss weight and the
  metric micro-batch TRL's split gave it.
* ``compute_loss``: a training micro-batch runs :meth:`hbmplan.MemoryContext.step` with TRL's
  per-token objective (:mod:`~hbmplan.integrations.trl_loss`); the backward happens there, and
  the returned loss (its value, for logging) is a leaf whose backward does nothing.
* ``_get_per_token_logps_and_entropies`` without gradients (old policy, reference model, with a
  PEFT adapter disabled by TRL around it): :func:`hbmplan.schedules.score_groups`, the prompt
  once per group.
* Hugging Face gradient checkpointing is switched off (``GRPOConfig`` turns it on by default):
  it would drop the K/V cache phase A fills. hbmplan's planner keeps, offloads or recomputes the
  prompt's activations instead (``ReuseConfig.hbm_budget``); a response microbatch's
  activations live for its own forward and backward, bounded by
  ``ReuseConfig.tokens_per_microbatch``.

Positions: TRL's left-padded rows count the pads in their positions; hbmplan's prompt starts at
position 0. With RoPE the attention scores are the same in real arithmetic (fp32 roundoff).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

try:
    import trl
except ImportError as exc:  # the extra is not installed
    raise ImportError(
        "hbmplan.integrations.trl needs TRL 1.16: pip install 'hbmplan[trl]' (or 'trl>=1.16,<1.17')"
    ) from exc
from torch.nn.parallel import DistributedDataParallel
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import shuffle_sequence_dict

from hbmplan.capacity.flops import dense_flops, reuse_flops
from hbmplan.capacity.presets import model_spec
from hbmplan.config import ReuseConfig
from hbmplan.integrations.trl_batches import (
    BATCH,
    WEIGHT,
    group_rows,
    loss_mask,
    regroup,
    row_weights,
)
from hbmplan.integrations.trl_loss import MetricWindow, Objective, Row
from hbmplan.integrations.trl_options import check_args, check_trl_version, exact_batches
from hbmplan.memory import MemoryContext
from hbmplan.models.adapter import adapt
from hbmplan.schedules.score import score_groups

check_trl_version(trl.__version__)

__all__ = ["ReuseGRPOTrainer"]

logger = logging.getLogger(__name__)

_MiB = 2**20


class _CloseMemory(TrainerCallback):
    def __init__(self, trainer: ReuseGRPOTrainer) -> None:
        self.trainer = trainer

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.close_memory()


class ReuseGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` on hbmplan's reuse schedule: same constructor, same ``GRPOConfig``.

    Args:
        model, reward_funcs, args, ...: as for ``trl.GRPOTrainer`` (positional order kept).
        reuse_config: hbmplan's step options (:class:`hbmplan.ReuseConfig`): ``hbm_budget`` and
            ``offload`` for long prompts, ``tokens_per_microbatch`` (default: the response tokens
            of one TRL micro-batch, ``per_device_train_batch_size * max_completion_length``).
            ``temperature`` and ``entropy`` are set from TRL.

    Raises:
        ValueError: a ``GRPOConfig`` option the reuse schedule cannot train exactly as TRL does
            (named, with the reason), a mixture-of-experts model with a router loss, a
            vision-language model, or a model family hbmplan does not support.
    """

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: GRPOConfig | None = None,
        *rest: Any,
        reuse_config: ReuseConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:  # as TRL builds its default
            name = model if isinstance(model, str) else model.config._name_or_path
            args = GRPOConfig(f"{str(name).split('/')[-1] or 'model'}-GRPO")
        if reuse_config is not None and not isinstance(reuse_config, ReuseConfig):
            raise TypeError(
                f"reuse_config must be an hbmplan ReuseConfig, got {type(reuse_config).__name__}"
            )
        check_args(args)
        # transformers >= 5.19 names it activation_checkpointing, gradient_checkpointing an alias
        checkpointing = bool(
            getattr(args, "activation_checkpointing", False) or args.gradient_checkpointing
        )
        if checkpointing:  # before TRL and Trainer act on it
            if hasattr(args, "activation_checkpointing"):
                args.activation_checkpointing = False
            args.gradient_checkpointing = False
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        if self._is_vlm:
            raise ValueError("ReuseGRPOTrainer trains text-only causal LMs, got a vision model")
        if self.aux_loss_enabled:
            raise ValueError(
                "ReuseGRPOTrainer cannot reproduce TRL's micro-batch router loss of a "
                f"mixture-of-experts model (router_aux_loss_coef={self.router_aux_loss_coef}): "
                "set router_aux_loss_coef=0.0 or use trl.GRPOTrainer"
            )
        kind = str(getattr(self.accelerator.distributed_type, "value", ""))
        if kind not in ("NO", "MULTI_CPU", "MULTI_GPU"):
            raise ValueError(
                f"ReuseGRPOTrainer runs on one process or data-parallel under DDP (accelerate's "
                f"default multi-process wrapping), got accelerate's {kind}: FSDP and DeepSpeed "
                "are not driven by the trainer (use hbmplan.memory with an FSDP2 model directly, "
                "or trl.GRPOTrainer)"
            )
        adapt(self.model)  # an unsupported family fails here, naming the supported ones
        if checkpointing:
            model_ = self.accelerator.unwrap_model(self.model)
            if hasattr(model_, "is_activation_checkpointing"):  # transformers >= 5.19
                if model_.is_activation_checkpointing:
                    model_.activation_checkpointing_disable()
            elif getattr(model_, "is_gradient_checkpointing", False):
                model_.gradient_checkpointing_disable()
            logger.warning(
                "ReuseGRPOTrainer: gradient_checkpointing=True (GRPOConfig's default) is replaced "
                "by hbmplan's planner: Hugging Face checkpointing is off; the prompt's activations "
                "are kept, offloaded or recomputed under ReuseConfig.hbm_budget, and each response "
                "microbatch holds its activations up to ReuseConfig.tokens_per_microbatch tokens"
            )
        self.replaced_gradient_checkpointing = checkpointing
        if not exact_batches(args):
            logger.warning(
                "ReuseGRPOTrainer: steps_per_generation=%d does not divide "
                "gradient_accumulation_steps=%d, so TRL would spread a prompt's generations over "
                "optimizer steps; whole groups go to micro-batches (and optimizer steps) instead",
                args.steps_per_generation,
                args.gradient_accumulation_steps,
            )
        config = reuse_config or ReuseConfig(
            tokens_per_microbatch=args.per_device_train_batch_size * args.max_completion_length
        )
        self.reuse_config = config.replace(temperature=float(self.temperature), entropy=True)
        self.objective = Objective(
            beta=float(self.beta),
            epsilon_low=float(self.epsilon_low),
            epsilon_high=float(self.epsilon_high),
            delta=args.delta,
            bias_correction_kl=bool(args.use_bias_correction_kl),
        )
        self._spec = model_spec(self.accelerator.unwrap_model(self.model).config)
        self._memory: MemoryContext | None = None
        self._window: MetricWindow | None = None
        self.add_callback(_CloseMemory(self))

    # -- batches ---------------------------------------------------------------------------

    def _row_weights(self, batch: dict[str, Any]) -> torch.Tensor:
        return row_weights(
            loss_mask(batch),
            self.loss_type,
            accumulation=self.current_gradient_accumulation_steps,
            steps_per_generation=self.args.steps_per_generation,
            num_items_in_batch=batch["num_items_in_batch"],
            max_completion_length=self.max_completion_length,
            num_processes=self.accelerator.num_processes,
        )

    def _prepare_inputs(self, generation_batch: Any) -> dict[str, Any]:
        """TRL's buffering of generation batches, with whole prompt groups per micro-batch."""
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        spg = self.args.steps_per_generation
        if self._step % (spg * self.num_iterations) == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            batch = shuffle_sequence_dict(batch)  # TRL's random draw, so both trainers agree
            self._buffered_inputs = regroup(batch, spg, self._row_weights, exact_batches(self.args))
            rows: dict[int, int] = {}
            for part in self._buffered_inputs:
                for j in part[BATCH].tolist():
                    rows[j] = rows.get(j, 0) + 1
            self._window = MetricWindow(rows, self.beta)
        return self._buffered_inputs[self._step % spg]

    # -- no-grad log-probs -----------------------------------------------------------------

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ):
        """Without gradients (old policy, reference model, evaluation): the prompt once per
        group (:func:`hbmplan.schedules.score_groups`); [B, C] log-probs (and entropies), 0 where
        the completion is padding, as TRL returns them. With gradients: TRL's own."""
        if torch.is_grad_enabled() or compute_aux_loss or any(multimodal.values()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size,
                compute_entropy, compute_aux_loss, **multimodal,
            )  # fmt: skip
        C = logits_to_keep
        grouped = group_rows(
            input_ids[:, :-C], attention_mask[:, :-C], input_ids[:, -C:], attention_mask[:, -C:]
        )
        with self.accelerator.autocast():
            logps, ents = score_groups(
                self.accelerator.unwrap_model(model),
                grouped.groups,
                temperature=self.reuse_config.temperature,
                tokens_per_microbatch=self.reuse_config.tokens_per_microbatch,
                entropy=compute_entropy,
            )
        B = input_ids.shape[0]
        out = torch.zeros(B, C, device=input_ids.device)
        ent = torch.zeros(B, C, device=input_ids.device) if compute_entropy else None
        for g, rows in enumerate(grouped.rows):
            for i, r in enumerate(rows):
                n = logps[g][i].numel()
                out[r, :n] = logps[g][i]
                if ent is not None:
                    ent[r, :n] = ents[g][i]
        mask = attention_mask[:, -C:].to(out.dtype)
        return out * mask, (ent * mask if ent is not None else None), None

    # -- the training loss -----------------------------------------------------------------

    def memory(self, model: Any) -> MemoryContext:
        """The hbmplan context the training steps run in (entered on first use, left when
        training ends: it keeps plans and the host pool across steps)."""
        if self._memory is None:
            if not isinstance(model, DistributedDataParallel):
                model = self.accelerator.unwrap_model(model)
            # a DDP model: hbmplan's driver averages the gradients once per optimizer step; DDP's
            # own reducer is never armed (its forward does not run), so nothing reduces twice
            self._memory = MemoryContext(model, self.reuse_config)
            self._memory.__enter__()
        return self._memory

    def close_memory(self) -> None:
        """Leave the hbmplan context (restores training flags; gives the host pool back)."""
        if self._memory is not None:
            self._memory.__exit__(None, None, None)
            self._memory = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The GRPOTrainer does not support returning outputs")
        if not (self.model.training and torch.is_grad_enabled()) or WEIGHT not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        grouped = group_rows(
            inputs["prompt_ids"], inputs["prompt_mask"],
            inputs["completion_ids"], inputs["completion_mask"],
        )  # fmt: skip
        mask = loss_mask(inputs).float()
        batches = inputs[BATCH].tolist()
        device = inputs["completion_ids"].device
        for g, rows in enumerate(grouped.rows):
            grouped.groups[g].data = {
                "rows": [self._row(inputs, mask, batches, r, grouped.groups[g], i)
                         for i, r in enumerate(rows)]
            }  # fmt: skip
        window = self._window
        loss = torch.zeros((), device=device)
        data_parallel = self.accelerator.num_processes > 1
        if grouped.groups or data_parallel:  # a rank without groups joins the others' reduction
            objective = self.objective

            def loss_fn(logp, group, i):
                return group.data["rows"][i].loss(logp, objective)

            stats = self.memory(model).step(
                grouped.groups, loss_fn, sync=self.accelerator.sync_gradients
            )
            if stats.loss is not None:  # None: nothing ran
                loss = stats.loss.detach().float()
            if grouped.groups:
                self._log_step(stats, grouped)
            if window is not None:
                for g, group in enumerate(grouped.groups):
                    for i, row in enumerate(group.data["rows"]):
                        window.add(row.batch, row.mask, row.stats, stats.token_entropy[g][i])
        if window is not None:
            for r in grouped.skipped:
                window.add(batches[r], None, {}, None)
            if not data_parallel:
                window.flush(self._metrics["train"])
            elif (self._step + 1) % self.args.steps_per_generation == 0:  # the pass's last
                window.flush(self._metrics["train"], self._gather)
        return loss.clone().requires_grad_()

    def _gather(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(values.to(self.accelerator.device))

    def _row(self, inputs, mask, batches, r: int, group, i: int) -> Row:
        S = group.responses[i].numel()

        def tokens(key):
            value = inputs.get(key)
            if value is None:
                return None
            return value[r, :S] if value.shape[1] > 1 else value[r]

        adv = inputs["advantages"][r]
        return Row(
            mask=mask[r, :S],
            advantage=adv[:S] if adv.dim() else adv,
            weight=inputs[WEIGHT][r],
            batch=batches[r],
            old=tokens("old_per_token_logps"),
            ref=tokens("ref_per_token_logps") if self.beta != 0.0 else None,
            is_ratio=tokens("importance_sampling_ratio")
            if self.use_vllm and self.vllm_importance_sampling_correction
            else None,
        )

    def _log_step(self, stats, grouped) -> None:
        metrics = self._metrics["train"]
        prompt = sum(g.prompt_len - 1 for g in grouped.groups)
        rows = sum(g.prompt_len - 1 + sum(r.numel() for r in g.responses) for g in grouped.groups)
        dense = sum(g.prompt_len + r.numel() - 1 for g in grouped.groups for r in g.responses)
        lens = [[r.numel() for r in g.responses] for g in grouped.groups]
        flops = [(dense_flops(self._spec, g.prompt_len, n), reuse_flops(self._spec, g.prompt_len, n))
                 for g, n in zip(grouped.groups, lens, strict=True)]  # fmt: skip
        metrics["hbmplan/prompt_tokens"].append(float(prompt))
        metrics["hbmplan/token_ratio"].append(dense / max(rows, 1))
        metrics["hbmplan/flop_ideal_speedup"].append(
            sum(d for d, _ in flops) / max(sum(r for _, r in flops), 1)
        )
        for name, phase in stats.phases.items():
            metrics[f"hbmplan/peak_MiB_{name}"].append(phase.peak_bytes / _MiB)
        off = stats.offload
        if off is not None and off.engine is not None:
            metrics["hbmplan/offloaded_MiB"].append(off.engine.bytes_offloaded / _MiB)
