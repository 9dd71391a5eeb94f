"""Pinned host memory pool and the offload/prefetch engine."""
