"""Model shapes for the frontier: :class:`ModelSpec`, named presets, and :func:`model_spec`, which
reads shapes from a Hugging Face config (object, ``config.json`` path or dict), an hbmplan
``DecoderConfig``, or a model instance. No weights are loaded, nothing is fetched."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["PRESETS", "ModelSpec", "model_spec", "spec_from_hf_config"]


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a decoder-only LM, all the byte model needs (no weights)."""

    name: str
    """Label used in reports."""
    vocab_size: int
    """V, token ids."""
    hidden_size: int
    """h, model width."""
    num_layers: int
    """L, decoder layers."""
    num_heads: int
    """Hq, query heads."""
    num_kv_heads: int
    """Hkv, key/value heads."""
    head_dim: int
    """D, per-head width."""
    intermediate_size: int
    """F, SwiGLU inner width of dense MLP layers."""
    tie_word_embeddings: bool = False
    """LM head shares the embedding matrix."""
    attention_bias: bool = False
    """q/k/v projections carry biases (Qwen2); parameters only."""
    qk_norm: bool = False
    """Per-head RMSNorm on q and k before RoPE (Qwen3)."""
    num_experts: int = 0
    """E, routed experts per MoE layer; 0: no MoE."""
    experts_per_token: int = 0
    """k, experts each token is routed to."""
    moe_intermediate_size: int = 0
    """Inner width of one expert's SwiGLU."""
    moe_layers: int = 0
    """How many of the L layers are MoE (the others use the dense MLP)."""
    impl: Literal["reference", "hf"] = "hf"
    """Whose tensors: hbmplan's reference decoder (norms in the model dtype, GQA prefix attention
    through ``enable_gqa``) or Hugging Face (norms upcast to fp32, K/V repeated to Hq heads when
    attention needs a mask)."""
    max_positions: int | None = None
    """The config's ``max_position_embeddings`` (informational)."""

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "intermediate_size"):  # fmt: skip
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads, got {self.num_heads} and "
                f"{self.num_kv_heads}"
            )
        if not 0 <= self.moe_layers <= self.num_layers:
            raise ValueError(
                f"moe_layers must lie in [0, {self.num_layers}], got {self.moe_layers}"
            )
        if self.moe_layers and min(self.num_experts, self.experts_per_token,
                                   self.moe_intermediate_size) < 1:  # fmt: skip
            raise ValueError(
                f"MoE layers need num_experts, experts_per_token and moe_intermediate_size >= 1, "
                f"got {self.num_experts}, {self.experts_per_token}, {self.moe_intermediate_size}"
            )

    @property
    def active_intermediate_size(self) -> int:
        """The MLP width one token's forward runs through, averaged over the layers: F in dense
        layers, k experts of their width in MoE layers (what FLOP counts use; routers left out)."""
        moe_width = self.experts_per_token * self.moe_intermediate_size
        dense = self.num_layers - self.moe_layers
        return round(
            (dense * self.intermediate_size + self.moe_layers * moe_width) / self.num_layers
        )

    def layer_parameters(self, moe: bool) -> int:
        """Parameters of one decoder layer (dense-MLP or MoE)."""
        h, D, Hq, Hkv = self.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads
        n = 2 * h * Hq * D + 2 * h * Hkv * D + 2 * h  # q, o, k, v, two RMSNorm scales
        n += (Hq + 2 * Hkv) * D if self.attention_bias else 0
        n += 2 * D if self.qk_norm else 0
        if moe:
            return n + self.num_experts * (3 * h * self.moe_intermediate_size + h)
        return n + 3 * h * self.intermediate_size

    @property
    def num_parameters(self) -> int:
        """All parameters: embedding, LM head (unless tied), layers, final norm."""
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        dense = self.num_layers - self.moe_layers
        return (
            self.vocab_size * self.hidden_size + head + self.hidden_size
            + dense * self.layer_parameters(False) + self.moe_layers * self.layer_parameters(True)
        )  # fmt: skip


PRESETS: dict[str, ModelSpec] = {
    # meta-llama/Meta-Llama-3-8B config.json: 8,030,261,248 parameters
    "llama3-8b": ModelSpec(
        name="llama3-8b", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, intermediate_size=14336, max_positions=8192,
    ),
    # Qwen/Qwen3-8B config.json: 8,190,735,360 parameters
    "qwen3-8b": ModelSpec(
        name="qwen3-8b", vocab_size=151936, hidden_size=4096, num_layers=36, num_heads=32,
        num_kv_heads=8, head_dim=128, intermediate_size=12288, qk_norm=True,
        max_positions=40960,
    ),
    # Qwen/Qwen3-30B-A3B config.json: 30,532,122,624 parameters (3.3B active per token)
    "qwen3-30b-a3b": ModelSpec(
        name="qwen3-30b-a3b", vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32,
        num_kv_heads=4, head_dim=128, intermediate_size=6144, qk_norm=True, num_experts=128,
        experts_per_token=8, moe_intermediate_size=768, moe_layers=48, max_positions=40960,
    ),
}  # fmt: skip
"""Published configs of the supported presets (Hugging Face tensors: norms upcast to fp32)."""

_QK_NORM_TYPES = {"qwen3", "qwen3_moe"}
_BIAS_TYPES = {"qwen2", "qwen2_moe"}


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    value = cfg.get(name, default) if isinstance(cfg, Mapping) else getattr(cfg, name, default)
    return default if value is None else value


def spec_from_hf_config(cfg: Any, name: str | None = None) -> ModelSpec:
    """:class:`ModelSpec` from a ``transformers.PretrainedConfig`` or a parsed ``config.json``.

    Reads hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads (default: the
    attention heads), head_dim (default h / Hq), intermediate_size, vocab_size,
    tie_word_embeddings (default False), and for MoE num_experts (or num_local_experts),
    num_experts_per_tok, moe_intermediate_size, decoder_sparse_step and mlp_only_layers.
    A multimodal config contributes its text config.
    """
    if not isinstance(cfg, Mapping) and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config(decoder=True)
    elif isinstance(cfg, Mapping) and isinstance(cfg.get("text_config"), Mapping):
        cfg = cfg["text_config"]
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if _get(cfg, k) is None]
    if missing:
        raise ValueError(f"a decoder config must define {list(required)}, missing {missing}")
    h, L, Hq = (
        int(_get(cfg, "hidden_size")),
        int(_get(cfg, "num_hidden_layers")),
        int(_get(cfg, "num_attention_heads")),
    )
    model_type = str(_get(cfg, "model_type", ""))
    experts = int(_get(cfg, "num_experts", _get(cfg, "num_local_experts", 0)))
    moe_layers = 0
    if experts:
        step = int(_get(cfg, "decoder_sparse_step", 1))
        dense_only = set(_get(cfg, "mlp_only_layers", []))
        moe_layers = sum(1 for i in range(L) if i not in dense_only and (i + 1) % step == 0)
    moe_ffn = int(_get(cfg, "moe_intermediate_size", _get(cfg, "intermediate_size", 0)))
    return ModelSpec(
        name=name or model_type or "hf-config",
        vocab_size=int(_get(cfg, "vocab_size")),
        hidden_size=h,
        num_layers=L,
        num_heads=Hq,
        num_kv_heads=int(_get(cfg, "num_key_value_heads", Hq)),
        head_dim=int(_get(cfg, "head_dim", h // Hq)),
        intermediate_size=int(_get(cfg, "intermediate_size", 4 * h)),
        tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
        attention_bias=bool(_get(cfg, "attention_bias", model_type in _BIAS_TYPES)),
        qk_norm=model_type in _QK_NORM_TYPES,
        num_experts=experts,
        experts_per_token=int(_get(cfg, "num_experts_per_tok", 0)),
        moe_intermediate_size=moe_ffn if experts else 0,
        moe_layers=moe_layers,
        impl="hf",
        max_positions=_get(cfg, "max_position_embeddings"),
    )


def _from_path(path: Path) -> ModelSpec:
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(
            f"a config path must be a config.json file or a directory holding one, got {str(path)!r}"
        )
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"config file must be valid JSON, got {str(file)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file must hold a JSON object, got {type(data).__name__}")
    name = file.parent.name if file.name == "config.json" else file.stem
    return spec_from_hf_config(data, name=name or None)


def model_spec(model_or_config: Any) -> ModelSpec:
    """Resolve what :func:`hbmplan.frontier` accepts into a :class:`ModelSpec`.

    Accepts a :class:`ModelSpec`, a preset name (see :data:`PRESETS`), a path to a
    ``config.json`` or a directory holding one, a parsed config dict, a Hugging Face config
    object, an hbmplan ``DecoderConfig`` or ``ReferenceDecoder``, or a Hugging Face model.
    """
    from hbmplan.models.reference import DecoderConfig, ReferenceDecoder

    obj = model_or_config
    if isinstance(obj, ModelSpec):
        return obj
    if isinstance(obj, ReferenceDecoder):
        obj = obj.cfg
    if isinstance(obj, DecoderConfig):
        return ModelSpec(
            name="reference", vocab_size=obj.vocab_size, hidden_size=obj.hidden_size,
            num_layers=obj.num_layers, num_heads=obj.num_heads, num_kv_heads=obj.num_kv_heads,
            head_dim=obj.dim, intermediate_size=obj.intermediate_size, impl="reference",
            max_positions=obj.max_positions,
        )  # fmt: skip
    if isinstance(obj, (str, os.PathLike)):
        key = str(obj).strip().lower()
        if key in PRESETS:
            return PRESETS[key]
        path = Path(obj).expanduser()
        if path.exists() or str(obj).endswith(".json") or os.sep in str(obj):
            return _from_path(path)
        raise ValueError(
            f"model must be a preset {sorted(PRESETS)} or a path to a config.json, got {obj!r}"
        )
    if isinstance(obj, Mapping):
        return spec_from_hf_config(obj)
    config = getattr(obj, "config", None)
    if config is not None and hasattr(config, "model_type"):  # a transformers model
        return spec_from_hf_config(config, name=getattr(config, "model_type", None))
    if hasattr(obj, "model_type") and hasattr(obj, "to_dict"):  # a transformers config
        return spec_from_hf_config(obj)
    raise TypeError(
        "model_or_config must be a preset name, a config.json path, a Hugging Face config or "
        f"model, a DecoderConfig, a ReferenceDecoder or a ModelSpec, got {type(obj).__name__}"
    )
