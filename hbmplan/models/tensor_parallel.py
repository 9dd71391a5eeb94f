"""What the reuse step checks on a model parallelised with DTensor tensor parallel (TP).

Under a Colwise (q/k/v) / Rowwise (o) plan each rank's attention sees its own heads only, so
phase A's prompt K/V, the gradient cache and phase B's attention are local head shards with no
extra communication. Three layouts would silently give wrong gradients, and are refused here
(:class:`hbmplan.ParallelLayoutError`) before a step changes anything:

* K/V heads not divisible by the TP degree (a head's features would straddle ranks);
* a replicated per-head norm left as a plain parameter (Qwen3's ``q_norm``/``k_norm`` under a
  projections-only plan): each rank normalises its own heads, so its gradient is a per-rank
  partial sum, wrong even for dense training;
* the same norm under Hugging Face's ``replicated_with_grad_allreduce`` style, which all-reduces
  ``.grad`` after every backward and over-counts once phase B runs several backwards.

The fix for both norm cases is torch's ``SequenceParallel(sequence_dim=2,
use_local_output=True)`` on the norm (its weight becomes a replicated DTensor and the heads axis
its shard axis), which :func:`hbmplan.distributed.tensor_parallel.tensor_parallel_plan` builds.
"""

from __future__ import annotations

from torch import nn

from hbmplan.errors import ParallelLayoutError

__all__ = [
    "PER_HEAD_NORMS",
    "check_tensor_parallel",
    "kv_heads_error",
    "tensor_parallel_degree",
]

PER_HEAD_NORMS = ("q_norm", "k_norm")
"""Attention submodules that normalise each head (Qwen3): replicated weights, sharded input."""


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "placements")


def _shard_degree(t) -> int:
    """The number of shards of a DTensor sharded on some mesh dimension (1 if replicated)."""
    degree = 1
    for dim, placement in enumerate(t.placements):
        if placement.is_shard():
            degree *= t.device_mesh.size(dim)
    return degree


def _fsdp2(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def tensor_parallel_degree(model: nn.Module) -> int:
    """The TP degree of ``model``: the most shards any DTensor parameter is split into; 1 for a
    model without DTensor parameters, and for an FSDP2 model (its DTensors are data-parallel
    shards, gathered before any compute; FSDP2 over TP is not checked here)."""
    if not any(_is_dtensor(p) for p in model.parameters()) or _fsdp2(model):
        return 1
    return max(_shard_degree(p) for p in model.parameters() if _is_dtensor(p))


def _attention_modules(layers: nn.ModuleList) -> list[tuple[str, nn.Module]]:
    out = []
    for i, layer in enumerate(layers):
        for name in ("self_attn", "attn"):
            attn = getattr(layer, name, None)
            if attn is not None:
                out.append((f"layers.{i}.{name}", attn))
                break
    return out


def kv_heads_error(kv_heads: int, degree: int) -> ParallelLayoutError:
    """The error for K/V heads not divisible by the TP degree."""
    return ParallelLayoutError(
        f"K/V heads must be divisible by the tensor-parallel degree, got {kv_heads} K/V heads "
        f"and degree {degree}: each rank must hold whole heads of the prompt K/V"
    )


def check_tensor_parallel(
    model: nn.Module, layers: nn.ModuleList, num_kv_heads: int, tp_plan: dict | None = None
) -> int:
    """Check a TP-parallelised model's layout; return the TP degree (1: not parallelised).

    Args:
        model: the model (its parameters are looked at).
        layers: its decoder layers (each with ``self_attn`` or ``attn``).
        num_kv_heads: Hkv of the model.
        tp_plan: Hugging Face's resolved plan (``model._tp_plan``), module patterns to styles.

    Raises:
        ParallelLayoutError: one of the layouts in the module docstring.
    """
    degree = tensor_parallel_degree(model)
    if degree == 1:
        return 1
    if num_kv_heads % degree != 0:
        raise kv_heads_error(num_kv_heads, degree)
    styles = {k: v for k, v in (tp_plan or {}).items() if v == "replicated_with_grad_allreduce"}
    for prefix, attn in _attention_modules(layers):
        for norm in PER_HEAD_NORMS:
            module = getattr(attn, norm, None)
            if module is None:
                continue
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not params or all(_is_dtensor(p) for p in params):
                continue
            # HF marks every module its plan touched; its class plan names the style
            hooked = getattr(module, "_is_hooked", False)
            hf_style = hooked and any(k.endswith(f"self_attn.{norm}") for k in styles)
            why = (
                "Hugging Face's 'replicated_with_grad_allreduce' all-reduces its .grad after "
                "every backward, which over-counts across phase B's backwards (and any "
                "gradient accumulation)"
                if hf_style
                else "it is a plain replicated parameter while each rank normalises only its "
                "own heads, so its gradient is a per-rank partial sum"
            )
            raise ParallelLayoutError(
                f"per-head norm {prefix}.{norm} under tensor parallel degree {degree}: {why}; "
                "parallelise it with torch's SequenceParallel(sequence_dim=2, "
                "use_local_output=True) (hbmplan.distributed.tensor_parallel_plan builds the "
                "supported plan)"
            )
    return degree
