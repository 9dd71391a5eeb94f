"""Analytic FLOP counts of the dense and reuse schedules, and the FLOP-ideal speedup.

Convention (docs/design.md): linear layers, attention at ``4 * Hq * D * keys`` per query per layer
(QK^T and PV, causal keys only), the LM head on response positions only, and backward = 2x
forward, so a trained token costs 3x its forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ModelShape", "dense_flops", "flop_ideal_speedup", "reuse_flops"]


@dataclass(frozen=True)
class ModelShape:
    """The shape numbers FLOP counts need."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, model) -> ModelShape:
        """From a ReferenceDecoder, its DecoderConfig, or a Hugging Face model/config."""
        from hbmplan.models.reference import DecoderConfig, ReferenceDecoder

        cfg = model.cfg if isinstance(model, ReferenceDecoder) else model
        if isinstance(cfg, DecoderConfig):
            return cls(cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
                       cfg.dim, cfg.intermediate_size, cfg.vocab_size)  # fmt: skip
        cfg = getattr(cfg, "config", cfg)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(cfg.hidden_size, cfg.num_hidden_layers, heads,
                   getattr(cfg, "num_key_value_heads", heads), head_dim,
                   cfg.intermediate_size, cfg.vocab_size)  # fmt: skip

    @property
    def linear_per_token(self) -> int:
        """Forward FLOPs of one token through one layer's projections and MLP."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        return 2 * (q_o + kv + 3 * self.hidden * self.intermediate)

    def attention(self, queries: int, keys_before: int) -> int:
        """Forward attention FLOPs of ``queries`` consecutive tokens, query ``j`` seeing
        ``keys_before + j + 1`` keys, in one layer."""
        keys = queries * keys_before + queries * (queries + 1) // 2
        return 4 * self.heads * self.head_dim * keys


def _train(forward: int) -> int:
    return 3 * forward


def dense_flops(shape: ModelShape, prompt_len: int, response_lens: Sequence[int]) -> int:
    """Training FLOPs of the dense trainer: each trajectory ``[p; r_i[:-1]]`` from scratch."""
    total = 0
    for s in response_lens:
        t = prompt_len + s - 1
        layer = shape.linear_per_token * t + shape.attention(t, 0)
        total += _train(shape.layers * layer + 2 * shape.hidden * shape.vocab * s)
    return total


def reuse_flops(
    shape: ModelShape, prompt_len: int, response_lens: Sequence[int], executed: bool = False
) -> int:
    """Training FLOPs of the reuse schedule: the prompt ``p[:-1]`` once, then each response row
    ``[p[-1]; r_i[:-1]]`` attending to the ``P - 1`` prompt keys.

    With ``executed=True`` the count is what the schedule actually runs: phase C back-propagates
    from the prompt K/V only, so in the last layer the prompt's query projection, attention,
    output projection and MLP run forward but never backward (the convention counts them 3x).
    """
    shared = prompt_len - 1
    prompt = shape.layers * (shape.linear_per_token * shared + shape.attention(shared, 0))
    total = _train(prompt)
    if executed:
        kv_proj = 2 * 2 * shape.hidden * shape.kv_heads * shape.head_dim * shared
        dead_tail = shape.linear_per_token * shared + shape.attention(shared, 0) - kv_proj
        total -= 2 * dead_tail
    for s in response_lens:
        layer = shape.linear_per_token * s + shape.attention(s, shared)
        total += _train(shape.layers * layer + 2 * shape.hidden * shape.vocab * s)
    return total


def flop_ideal_speedup(shape: ModelShape, prompt_len: int, response_lens: Sequence[int]) -> float:
    """Dense FLOPs / reuse FLOPs: the speedup if both ran at the same FLOP rate."""
    return dense_flops(shape, prompt_len, response_lens) / reuse_flops(
        shape, prompt_len, response_lens
    )
