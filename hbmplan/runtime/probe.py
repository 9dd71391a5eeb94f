"""The probe: before the first long prompt of a memory context there is no capture to predict a
plan from, so a short forward of the prompt's first :data:`PROBE_TOKENS` tokens gives one (no
backward, RNG state restored); the group then plans, and streams, before its own phase A."""

from __future__ import annotations

import torch

from hbmplan.kernels.accumulate import accumulation_dtype
from hbmplan.runtime.capture import SavedTensorCapture
from hbmplan.runtime.participant import GroupContext, Participant
from hbmplan.runtime.planning import PromptPlanner

__all__ = ["PROBE_TOKENS", "Probe"]

PROBE_TOKENS = 127
"""Prompt tokens of the probe forward: short, and (odd, prime) unlikely to equal a model dim,
which the rescaling would take for the sequence dim."""


class Probe(Participant):
    """Runs the probe forward in ``before_a`` when ``planner`` has no capture yet, predicts,
    offloads, and the prompt is long enough that streaming its first group matters (over twice
    :data:`PROBE_TOKENS`); hands the capture to ``planner.learn``."""

    def __init__(self, planner: PromptPlanner) -> None:
        self.planner = planner

    def wanted(self, prompt_tokens: int) -> bool:
        """Whether a group whose phase A runs ``prompt_tokens`` (P - 1) tokens needs a probe."""
        p = self.planner
        return (
            p.mode != "off"
            and p.predicts
            and not p.has_template
            and prompt_tokens > 2 * PROBE_TOKENS
        )

    def before_a(self, ctx: GroupContext) -> None:
        if not ctx.step.prompt_graph or not self.wanted(ctx.plan.prompt_tokens):
            return  # (without a graph phase A saves nothing: nothing to plan)
        n, adapter, prompt = PROBE_TOKENS, ctx.adapter, ctx.group.prompt
        capture = SavedTensorCapture(ctx.step.model_storages(), adapter.layers)
        capture.check_inputs = self.planner.checks_inputs
        kwargs = {"router_logits": []} if ctx.step.routed else {}
        devices = [prompt.device] if prompt.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad(), capture.phase("A"):
                # the real phase A reads all but the last of P tokens: the same storage layout
                ids = prompt[: n + 1].clone()[None, :-1]
                kvs = adapter.prompt_kv(ids, torch.arange(n, device=prompt.device)[None], **kwargs)
            kv = [t for pair in kvs for t in pair]
            cache_dtype = ctx.step.config.grad_cache_dtype or accumulation_dtype(kv[0].dtype)
            # a K/V without a graph (frozen weights only) has no gradient buffer
            cache_bytes = sum(t.numel() for t in kv if t.requires_grad) * cache_dtype.itemsize
            self.planner.learn(capture, kv, cache_bytes, sum(t.nbytes for t in kv), n)
        finally:
            capture.release()
