"""Tensor parallel (DTensor) for the reuse step: the supported plans, built for a model.

The reuse step runs unchanged on a model parallelised with ``parallelize_module``: Colwise
q/k/v make each rank's prompt K/V, gradient cache and phase-B attention its own head shard
(no communication beyond the plan's own), Rowwise o/down all-reduce the layer outputs. What it
cannot run exactly is refused before a step (:mod:`hbmplan.models.tensor_parallel`).

Supported plans (tested on CPU/gloo, TP=2, fp64 gradients equal to single-process dense):

====================  ===========================================================  ==========
model                 plan                                                         notes
====================  ===========================================================  ==========
reference decoder     Colwise q/k/v, gate/up; Rowwise o, down                      ``tensor_parallel_plan``
HF Llama/Qwen2/Mistral  same, under ``model.layers.*``; or HF's own ``tp_plan``    ``DistributedConfig(tp_size=...)``
HF Qwen3              same, plus ``SequenceParallel(sequence_dim=2,                HF's own plan refused:
                      use_local_output=True)`` on ``q_norm``/``k_norm``            its norm style over-counts
====================  ===========================================================  ==========

Embeddings, the final norm and the LM head stay replicated in :func:`tensor_parallel_plan`
(each rank computes their full gradient); HF's plan may shard the embedding (vocab-parallel),
which runs too. Offload (``hbm_budget``) is not supported under TP yet.
"""

from __future__ import annotations

from torch import nn

from hbmplan.models.adapter import adapt
from hbmplan.models.tensor_parallel import (
    PER_HEAD_NORMS,
    check_tensor_parallel,
    kv_heads_error,
    tensor_parallel_degree,
)

__all__ = [
    "check_tensor_parallel",
    "parallelize",
    "tensor_parallel_degree",
    "tensor_parallel_plan",
]


def tensor_parallel_plan(model: nn.Module) -> dict:
    """The supported ``parallelize_module`` plan for ``model`` (module path -> style).

    Attention: Colwise q/k/v, Rowwise o; per-head norms (Qwen3 ``q_norm``/``k_norm``):
    ``SequenceParallel(sequence_dim=2, use_local_output=True)``, the heads axis of their
    [B, T, H, D] input being the shard axis; MLP: Colwise gate/up, Rowwise down. Mixture-of-
    experts MLPs are left replicated (each rank runs every expert on all tokens).
    """
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
    )

    adapter = adapt(model)
    names = {m: n for n, m in model.named_modules()}
    plan: dict = {}
    for layer in adapter.layers:
        prefix = names[layer]
        attn_name = "self_attn" if hasattr(layer, "self_attn") else "attn"
        attn = getattr(layer, attn_name)
        a = f"{prefix}.{attn_name}"
        plan.update({f"{a}.q_proj": ColwiseParallel(), f"{a}.k_proj": ColwiseParallel(),
                     f"{a}.v_proj": ColwiseParallel(), f"{a}.o_proj": RowwiseParallel()})  # fmt: skip
        for norm in PER_HEAD_NORMS:
            if getattr(attn, norm, None) is not None:
                plan[f"{a}.{norm}"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        mlp = getattr(layer, "mlp", layer)
        m = f"{prefix}.mlp" if mlp is not layer else prefix
        if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj")):
            plan.update({f"{m}.gate_proj": ColwiseParallel(), f"{m}.up_proj": ColwiseParallel(),
                         f"{m}.down_proj": RowwiseParallel()})  # fmt: skip
    return plan


def parallelize(model: nn.Module, tp_mesh) -> nn.Module:
    """``parallelize_module(model, tp_mesh, tensor_parallel_plan(model))``, then the reuse
    step's layout check (:class:`hbmplan.ParallelLayoutError` for K/V heads not divisible by
    the mesh size). Returns ``model`` (parallelised in place)."""
    from torch.distributed.tensor.parallel import parallelize_module

    adapter = adapt(model)
    cfg = getattr(model, "cfg", None)
    kv_heads = cfg.num_kv_heads if cfg is not None else model.config.num_key_value_heads
    if kv_heads % tp_mesh.size() != 0:
        raise kv_heads_error(kv_heads, tp_mesh.size())
    parallelize_module(model, tp_mesh, tensor_parallel_plan(model))
    adapter.check_schedulable()
    return model
