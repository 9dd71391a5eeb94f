"""Analytic FLOP counts of the dense and reuse schedules, and the FLOP-ideal speedup.

Convention (docs/design.md): linear layers, attention at ``4 * Hq * D * keys`` per query per layer
(QK^T and PV, causal keys only), the LM head on response positions only, and backward = 2x
forward, so a trained token costs 3x its forward. Shapes come from a
:class:`~hbmplan.capacity.presets.ModelSpec` (or anything :func:`model_spec` reads: a model, a
config, a preset name); the MLP at ``active_intermediate_size`` (a MoE layer: the k experts a
token runs through).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hbmplan.capacity.presets import ModelSpec, model_spec

__all__ = [
    "attention_flops",
    "dense_flops",
    "flop_ideal_speedup",
    "linear_flops_per_token",
    "reuse_flops",
    "skipped_flops",
]


def _spec(shape: Any) -> ModelSpec:
    return shape if isinstance(shape, ModelSpec) else model_spec(shape)


def linear_flops_per_token(spec: ModelSpec) -> int:
    """Forward FLOPs of one token through one layer's projections and MLP."""
    h, D = spec.hidden_size, spec.head_dim
    q_o = 2 * h * spec.num_heads * D
    kv = 2 * h * spec.num_kv_heads * D
    return 2 * (q_o + kv + 3 * h * spec.active_intermediate_size)


def attention_flops(spec: ModelSpec, queries: int, keys_before: int) -> int:
    """Forward attention FLOPs of ``queries`` consecutive tokens, query ``j`` seeing
    ``keys_before + j + 1`` keys, in one layer."""
    keys = queries * keys_before + queries * (queries + 1) // 2
    return 4 * spec.num_heads * spec.head_dim * keys


def _train(forward: int) -> int:
    return 3 * forward


def dense_flops(shape: ModelSpec | Any, prompt_len: int, response_lens: Sequence[int]) -> int:
    """Training FLOPs of the dense trainer: each trajectory ``[p; r_i[:-1]]`` from scratch."""
    s = _spec(shape)
    total = 0
    for n in response_lens:
        t = prompt_len + n - 1
        layer = linear_flops_per_token(s) * t + attention_flops(s, t, 0)
        total += _train(s.num_layers * layer + 2 * s.hidden_size * s.vocab_size * n)
    return total


def reuse_flops(
    shape: ModelSpec | Any, prompt_len: int, response_lens: Sequence[int], executed: bool = False
) -> int:
    """Training FLOPs of the reuse schedule: the prompt ``p[:-1]`` once, then each response row
    ``[p[-1]; r_i[:-1]]`` attending to the ``P - 1`` prompt keys.

    With ``executed=True`` the count is what the schedule actually runs: phase C back-propagates
    from the prompt K/V only, so in the last layer the prompt's query projection, attention,
    output projection and MLP run forward but never backward (the convention counts them 3x).
    """
    s = _spec(shape)
    shared = prompt_len - 1
    per_layer = linear_flops_per_token(s) * shared + attention_flops(s, shared, 0)
    total = _train(s.num_layers * per_layer)
    if executed:
        kv_proj = 2 * 2 * s.hidden_size * s.num_kv_heads * s.head_dim * shared
        total -= 2 * (per_layer - kv_proj)
    for n in response_lens:
        layer = linear_flops_per_token(s) * n + attention_flops(s, n, shared)
        total += _train(s.num_layers * layer + 2 * s.hidden_size * s.vocab_size * n)
    return total


def skipped_flops(
    shape: ModelSpec | Any, shapes: Sequence[tuple[int, Sequence[int], Sequence[int]]]
) -> int:
    """Reuse-schedule training FLOPs that exact skipping saved: per group ``(P, response lengths,
    tokens run per response)`` (:class:`hbmplan.runtime.stats.SkipStats` ``shapes``), the
    group's FLOPs minus those of what ran (nothing, phases A and C included, when every response
    was inert)."""
    s = _spec(shape)
    saved = 0
    for prompt_len, lengths, ran in shapes:
        kept = [n for n in ran if n > 0]
        saved += reuse_flops(s, prompt_len, lengths)
        saved -= reuse_flops(s, prompt_len, kept) if kept else 0
    return saved


def flop_ideal_speedup(
    shape: ModelSpec | Any, prompt_len: int, response_lens: Sequence[int]
) -> float:
    """Dense FLOPs / reuse FLOPs: the speedup if both ran at the same FLOP rate."""
    s = _spec(shape)
    return dense_flops(s, prompt_len, response_lens) / reuse_flops(s, prompt_len, response_lens)


class _ModelShape:
    """The 0.1 shape type, now a :class:`ModelSpec` built from the seven numbers FLOP counts
    need (``ModelShape(hidden, layers, heads, kv_heads, head_dim, intermediate, vocab)``)."""

    def __new__(
        cls,
        hidden: int,
        layers: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        intermediate: int,
        vocab: int,
    ) -> ModelSpec:
        return ModelSpec(
            name="model-shape", vocab_size=vocab, hidden_size=hidden, num_layers=layers,
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            intermediate_size=intermediate,
        )  # fmt: skip

    @classmethod
    def of(cls, model: Any) -> ModelSpec:
        """From a ReferenceDecoder, its DecoderConfig, or a Hugging Face model/config."""
        s = model_spec(model)
        return cls(s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim,
                   s.intermediate_size, s.vocab_size)  # fmt: skip


def __getattr__(name: str):
    """``ModelShape`` (0.1) for one more release, with a ``DeprecationWarning``: FLOP counts
    take a :class:`ModelSpec`, the one shape type."""
    if name != "ModelShape":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import warnings

    warnings.warn(
        "ModelShape moved to hbmplan.capacity.ModelSpec (flops take a ModelSpec, a model or a "
        "config); the old name goes in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return _ModelShape
