"""Models the schedules run: hbmplan's reference decoder and Hugging Face adapters."""

from hbmplan.models.adapter import CausalLMAdapter, ReferenceAdapter, adapt
from hbmplan.models.reference import DecoderConfig, ReferenceDecoder

__all__ = ["CausalLMAdapter", "DecoderConfig", "ReferenceAdapter", "ReferenceDecoder", "adapt"]
