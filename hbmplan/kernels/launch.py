"""Launch heuristics shared by the Triton kernels: what hardware and Triton are present (detected
once), block sizes and warps per head dim, and how far to split the prompt's dK/dV work.

The tile configs start from FlashAttention-2's tile shapes and are not yet tuned on a GPU;
``tools/bench_attention.py --sweep`` times the alternatives.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "AttentionConfigs",
    "Backend",
    "KernelConfig",
    "attention_configs",
    "detect",
    "prefix_split",
]

SUPPORTED_HEAD_DIMS = (64, 128)
"""Head dims the Triton attention kernels handle; others go through the reference."""


@dataclass(frozen=True)
class Backend:
    """What this process can run, detected once by :func:`detect`."""

    cuda: bool
    """A CUDA device is visible."""
    triton: bool
    """The ``triton`` package imports."""
    interpret: bool
    """Triton runs kernels in its CPU interpreter: ``TRITON_INTERPRET=1`` was set before Triton was
    first imported (``import torch.nn.attention`` imports it). Fixed for the process: Triton
    decorates its own library functions at import."""
    triton_version: str | None
    """``triton.__version__``, or ``None`` without Triton."""
    sm_count: int
    """Streaming multiprocessors of device 0; a nominal 4 on the interpreter, which makes small
    test shapes take the split (atomic) prompt-gradient path."""


@functools.cache
def detect() -> Backend:
    """Detect CUDA and Triton once per process."""
    cuda = torch.cuda.is_available()
    try:
        import triton
        import triton.language as tl
        from triton.runtime.jit import JITFunction
    except ImportError:
        return Backend(cuda, False, False, None, 0)
    # ground truth for interpreter mode: how Triton decorated its own library at import
    interpret = not isinstance(tl.sum, JITFunction)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 0
    return Backend(cuda, True, interpret, triton.__version__, 4 if interpret else sms)


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch parameters of one kernel."""

    block_m: int
    """Queries per tile."""
    block_n: int
    """Keys per tile."""
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class AttentionConfigs:
    """Configs of the four prefix-attention kernels for one head dim and dtype."""

    fwd: KernelConfig
    """Forward: one program per (query tile, query head), looping over key tiles."""
    dq: KernelConfig
    """dQ (and rowsum(dO * O)): the forward's loop structure."""
    dkdv: KernelConfig
    """dK/dV: one program per (key tile, KV head), looping over query tiles of every head of the
    group; used for the prompt keys and the responses' own keys."""


# bf16/fp16 tiles: forward and dQ as FlashAttention-2 (128 x 64); dK/dV as its sm80 backward
# (64 queries x 128 keys, 8 warps at D=128 so the two fp32 accumulators stay in registers)
_HALF = {
    64: AttentionConfigs(
        fwd=KernelConfig(128, 64, 4, 3),
        dq=KernelConfig(128, 64, 4, 3),
        dkdv=KernelConfig(64, 128, 4, 3),
    ),
    128: AttentionConfigs(
        fwd=KernelConfig(128, 64, 8, 3),
        dq=KernelConfig(128, 64, 8, 2),
        dkdv=KernelConfig(64, 128, 8, 2),
    ),
}
# fp32 tiles are twice the bytes: halve them so shared memory still fits
_FP32 = {
    d: AttentionConfigs(
        fwd=KernelConfig(64, 32, c.fwd.num_warps, 2),
        dq=KernelConfig(64, 32, c.dq.num_warps, 2),
        dkdv=KernelConfig(32, 64, c.dkdv.num_warps, 2),
    )
    for d, c in _HALF.items()
}
# The interpreter: small tiles with the same ratios (query tile = 2 key tiles in forward/dQ, key
# tile = 2 query tiles in dK/dV), so that tiny test shapes cover several tiles and partial ones.
_INTERPRET = AttentionConfigs(
    fwd=KernelConfig(32, 16, 1, 1), dq=KernelConfig(32, 16, 1, 1), dkdv=KernelConfig(16, 32, 1, 1)
)


def attention_configs(head_dim: int, dtype: torch.dtype) -> AttentionConfigs:
    """Kernel configs for a head dim in :data:`SUPPORTED_HEAD_DIMS` and a 16- or 32-bit dtype."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"Triton attention supports head dims {SUPPORTED_HEAD_DIMS}, got {head_dim}"
        )
    if detect().interpret:
        return _INTERPRET
    return (_FP32 if dtype == torch.float32 else _HALF)[head_dim]


def prefix_split(key_tiles: int, kv_heads: int, query_tiles: int, deterministic: bool) -> int:
    """Into how many query ranges to split the prompt dK/dV kernel.

    One program per (prompt key tile, KV head) loops over every query and owns its slice of the
    gradient cache, so it adds with a plain load-add-store: deterministic. When those programs
    fill less than half the SMs (short prompts, few KV heads), each one's query loop is split over
    ``SMs // programs`` programs whose partial sums meet in the cache through fp32 atomics, in an
    order that varies run to run. ``deterministic`` forbids the split.
    """
    if deterministic:
        return 1
    programs = max(key_tiles * kv_heads, 1)
    return max(1, min(detect().sm_count // programs, query_tiles))
