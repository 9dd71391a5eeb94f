"""Pure-PyTorch references and (with CUDA) Triton kernels for the schedules."""

from hbmplan.kernels.prefix_attention import prefix_attention
from hbmplan.kernels.reference import prefix_attention_ref, prefix_attention_varlen_ref

__all__ = ["prefix_attention", "prefix_attention_ref", "prefix_attention_varlen_ref"]
