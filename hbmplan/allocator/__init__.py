"""Pinned host memory pool and the offload/prefetch engine."""

from hbmplan.allocator.engine import OffloadEngine, OffloadHandle, OffloadStats
from hbmplan.allocator.pool import (
    Block,
    HostMemoryError,
    HostPool,
    PoolExhaustedError,
    PoolStats,
    default_ram_margin,
)
from hbmplan.allocator.views import TensorMeta, rebuild, storage_bytes

__all__ = [
    "Block",
    "HostMemoryError",
    "HostPool",
    "OffloadEngine",
    "OffloadHandle",
    "OffloadStats",
    "PoolExhaustedError",
    "PoolStats",
    "TensorMeta",
    "default_ram_margin",
    "rebuild",
    "storage_bytes",
]
