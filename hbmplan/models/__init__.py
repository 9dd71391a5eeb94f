"""Models the schedules run: hbmplan's reference decoders (dense and mixture-of-experts) and
Hugging Face adapters."""

from hbmplan.models.adapter import CausalLMAdapter, MoEAdapter, ReferenceAdapter, adapt
from hbmplan.models.moe import MoEConfig, MoEDecoder, RouterSpec
from hbmplan.models.reference import DecoderConfig, ReferenceDecoder

__all__ = [
    "CausalLMAdapter",
    "DecoderConfig",
    "MoEAdapter",
    "MoEConfig",
    "MoEDecoder",
    "ReferenceAdapter",
    "ReferenceDecoder",
    "RouterSpec",
    "adapt",
]
