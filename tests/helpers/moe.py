"""Tiny mixture-of-experts models (hbmplan's and Hugging Face's) and router-loss checks shared by
the MoE, router, packed-row and offload tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hbmplan.models import MoEConfig, MoEDecoder, RouterSpec
from tests.helpers import VOCAB

__all__ = [
    "HF_MOE",
    "aux_by_definition",
    "grad_diff",
    "hf_load_balancing_loss_func",
    "tiny_hf_moe",
    "tiny_moe",
]

HF_MOE = {
    "Qwen3Moe": dict(num_experts=5, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
    "Mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "Qwen2Moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                     shared_expert_intermediate_size=24),
}  # fmt: skip


def tiny_moe(dtype=torch.float64, seed=0, experts=6, top_k=2, aux=0.5, z=0.0, layers=2, **kw):
    torch.manual_seed(seed)
    cfg = MoEConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=layers, num_heads=4, num_kv_heads=2,
        head_dim=None, num_experts=experts, top_k=top_k, expert_intermediate_size=16,
        router_aux_loss_coef=aux, router_z_loss_coef=z, max_positions=512, **kw,
    )  # fmt: skip
    return MoEDecoder(cfg).to(dtype)


def tiny_hf_moe(family="Qwen3Moe", dtype=torch.float64, seed=0, coef=0.5, on=True, **over):
    """A tiny Hugging Face MoE model; experts run eagerly (grouped_mm has no fp64 kernel)."""
    import transformers

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        output_router_logits=on, router_aux_loss_coef=coef, experts_implementation="eager",
    )  # fmt: skip
    kw.update(HF_MOE[family])
    kw.update(over)
    config = getattr(transformers, f"{family}Config")(**kw)
    config._attn_implementation = "sdpa"
    return getattr(transformers, f"{family}ForCausalLM")(config).to(dtype)


def grad_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Like ``max_rel_diff``, but a parameter's error is measured against at least 1e-3 of the
    largest gradient of any parameter: a gradient that vanishes in real arithmetic (the router
    of a single expert, or of a layer whose top-1 counts are balanced under renormalised top-k
    weights; attention over one repeated token) holds only roundoff of the other gradients'
    size, whose ratio to its own size is meaningless."""
    assert a.keys() == b.keys(), f"different parameters got gradients: {a.keys() ^ b.keys()}"
    floor = 1e-3 * max(t.abs().max().item() for t in b.values())
    return max(
        (a[n] - b[n]).abs().max().item() / max(b[n].abs().max().item(), floor, 1e-300) for n in b
    )


def hf_load_balancing_loss_func():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    return load_balancing_loss_func


def aux_by_definition(logits: list[torch.Tensor], spec: RouterSpec) -> torch.Tensor:
    """Switch-style loss per layer, straight from its definition, for one token set."""
    total = 0
    for lg in logits:  # [n, E]
        probs = lg.softmax(-1)
        chosen = F.one_hot(probs.topk(spec.top_k, -1).indices, spec.num_experts).sum(1)
        f = chosen.double().mean(0) / spec.top_k  # fraction of (token, slot) pairs
        total = total + spec.num_experts * (f * probs.mean(0)).sum()
    return total
