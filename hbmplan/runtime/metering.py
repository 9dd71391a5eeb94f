"""Byte metering where no allocator reports peaks (CPU): each phase's peak is the bytes of the
tensors the schedule holds, counted by saved-tensor captures (saved activations, prompt K/V,
gradient cache). On CUDA the caching allocator's peaks are exact and this participant is off."""

from __future__ import annotations

import contextlib

from hbmplan.runtime.capture import SavedTensorCapture
from hbmplan.runtime.participant import GroupContext, MicrobatchContext, Participant

__all__ = ["ByteMeter"]


class ByteMeter(Participant):
    """Records into the step's stats: A, the prompt capture's peak plus the K/V it did not
    record; B, what the prompt holds after phase A's offloads plus the gradient cache plus the
    microbatch's saved tensors just before its backward; C, the prompt's held bytes plus the
    gradient cache. List it after the participants that offload, so it sees their effect."""

    captures_prompt = True

    def __init__(self) -> None:
        self._held = self._cache = 0
        self._mb: SavedTensorCapture | None = None
        self._hooks = contextlib.ExitStack()

    def after_a(self, ctx: GroupContext) -> None:
        capture, stats = ctx.capture, ctx.step.stats
        stats.record_peak("A", capture.peak_nbytes + capture.unrecorded_nbytes(ctx.hot))
        self._held = capture.held_nbytes(ctx.hot)
        self._cache = ctx.grad_cache_bytes

    def before_microbatch(self, ctx: MicrobatchContext) -> None:
        # the prompt K/V the kernel saves are counted in the prompt's held bytes
        group = ctx.group
        exclude = group.step.model_storages() + list(group.hot)
        self._mb = SavedTensorCapture(exclude, group.adapter.layers)
        self._hooks.enter_context(self._mb.phase("B"))

    def before_backward(self, ctx: MicrobatchContext) -> None:
        self._hooks.close()
        ctx.group.step.stats.record_peak("B", self._held + self._cache + self._mb.peak_nbytes)

    def after_microbatch(self, ctx: MicrobatchContext) -> None:
        self._release()

    def before_c(self, ctx: GroupContext) -> None:
        ctx.step.stats.record_peak("C", self._held + self._cache)

    def abort(self, exc: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        self._hooks.close()
        if self._mb is not None:
            self._mb.release()
            self._mb = None
