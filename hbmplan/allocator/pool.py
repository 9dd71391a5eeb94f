"""One host buffer, allocated once, sub-allocated into aligned blocks for offloaded storages.

Pinned (page-locked) when CUDA is present so that D2H/H2D copies run asynchronously at link
speed; pageable on CPU. A freed block is reused only after the copy events it was given complete.
"""

from __future__ import annotations

import bisect
import itertools
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import psutil
import torch

from hbmplan.errors import HostMemoryError, PoolExhaustedError

__all__ = [
    "Block",
    "CopyEvent",
    "HostMemoryError",
    "HostPool",
    "PoolExhaustedError",
    "PoolStats",
    "default_ram_margin",
]

_GIB = 1 << 30
_pool_ids = itertools.count()


class CopyEvent(Protocol):
    """What :meth:`HostPool.free` needs of an event (``torch.cuda.Event`` has both)."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


@dataclass(frozen=True, eq=False)
class Block:
    """A sub-allocation: bytes ``[offset, offset + size)`` of its pool's buffer.

    ``nbytes`` is what was asked for; ``size`` is that rounded up to the pool's alignment.
    Blocks compare by identity: a block freed and re-issued at the same offset is a new block.
    """

    offset: int
    nbytes: int
    size: int
    pool_id: int


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a :class:`HostPool`; all sizes in bytes.

    Attributes:
        capacity: size of the buffer.
        used: bytes held by live blocks and by freed blocks whose events are still pending.
        peak_used: the largest ``used`` seen since the pool was created.
        free_bytes: ``capacity - used``.
        free_ranges: number of disjoint free ranges (1 when fully coalesced and empty).
        largest_free: the largest free range.
        live_blocks: blocks allocated and not freed.
        pending_blocks: blocks freed with an event that has not been seen complete yet.
        host_wait_s: seconds the host spent in ``event.synchronize()`` to make room.
        pinned: whether the buffer is page-locked.
    """

    capacity: int
    used: int
    peak_used: int
    free_bytes: int
    free_ranges: int
    largest_free: int
    live_blocks: int
    pending_blocks: int
    host_wait_s: float
    pinned: bool


def default_ram_margin(total: int) -> int:
    """Host RAM left free beside the pool: 2 GiB or 10% of ``total`` bytes, whichever is more."""
    return max(2 * _GIB, total // 10)


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int of bytes, got {value!r}")
    return value


def _release_buffer(raw: torch.Tensor, registered: bool) -> None:
    # A finalizer (not a method) so that a pool dropped without close() still unregisters
    # its pages before the allocator frees them.
    if registered:
        torch.cuda.cudart().cudaHostUnregister(raw.data_ptr())


class HostPool:
    """A host buffer of ``nbytes`` bytes (rounded up to ``alignment``) handed out as blocks.

    Args:
        nbytes: capacity in bytes.
        pin: page-lock the buffer; default: ``torch.cuda.is_available()``. Pinning registers a
            pageable ``uint8`` tensor with ``cudaHostRegister`` instead of using
            ``pin_memory=True``: torch's pinned allocator rounds requests up to a power of two
            (a 33 GiB pool would lock 64 GiB) and keeps freed blocks cached, so ``close()``
            would not return the memory.
        alignment: every block starts at a multiple of this many bytes (a power of two).
        ram_margin: host RAM bytes that must stay free beside the pool; default
            :func:`default_ram_margin` of the machine's total RAM.

    Raises:
        HostMemoryError: if ``psutil.virtual_memory().available - ram_margin < capacity``,
            before anything is allocated.

    Not thread-safe: one owner (the offload engine) allocates and frees.
    """

    def __init__(
        self,
        nbytes: int,
        *,
        pin: bool | None = None,
        alignment: int = 512,
        ram_margin: int | None = None,
    ):
        _check_size("nbytes", nbytes)
        _check_size("alignment", alignment)
        if alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        if pin is None:
            pin = torch.cuda.is_available()
        if pin and not torch.cuda.is_available():
            raise ValueError("pin=True needs CUDA to page-lock memory; none is available")
        self._id = next(_pool_ids)
        self.alignment = alignment
        self.capacity = -(-nbytes // alignment) * alignment
        mem = psutil.virtual_memory()
        margin = default_ram_margin(mem.total) if ram_margin is None else ram_margin
        if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
            raise ValueError(f"ram_margin must be a non-negative int of bytes, got {margin!r}")
        # Over-allocate by one alignment unit so block offsets are aligned as addresses too.
        request = self.capacity + alignment
        if request > mem.available - margin:
            raise HostMemoryError(request, mem.available, margin)

        raw = torch.empty(request, dtype=torch.uint8)
        start = -raw.data_ptr() % alignment
        self._buf = raw[start : start + self.capacity]
        self.pinned = bool(pin)
        if self.pinned:
            err = int(torch.cuda.cudart().cudaHostRegister(raw.data_ptr(), request, 1))
            if err != 0:  # 1 = cudaHostRegisterPortable: usable from every device's context
                raise RuntimeError(f"cudaHostRegister of {request} bytes failed, cudaError {err}")
        self._finalizer = weakref.finalize(self, _release_buffer, raw, self.pinned)

        self._free: list[list[int]] = [[0, self.capacity]]  # [offset, size], sorted by offset
        self._live: dict[int, Block] = {}  # offset -> block
        self._pending: deque[tuple[CopyEvent, Block]] = deque()
        self._used = self._peak = 0
        self._host_wait_s = 0.0
        self.closed = False

    # -- allocation ----------------------------------------------------------------------------
    def allocate(self, nbytes: int) -> Block:
        """Reserve ``nbytes`` bytes (rounded up to the alignment); best fit over the free list.

        Blocks freed with an event are reclaimed first if their events have completed; if the
        request still does not fit, the oldest pending events are synchronized one by one.

        Raises:
            PoolExhaustedError: if no free range can hold the request.
        """
        self._check_open()
        _check_size("nbytes", nbytes)
        size = -(-nbytes // self.alignment) * self.alignment
        self._reclaim()
        index = self._best_fit(size)
        while index is None and self._pending:
            event, block = self._pending.popleft()
            t0 = time.perf_counter()
            event.synchronize()
            self._host_wait_s += time.perf_counter() - t0
            self._release(block)
            index = self._best_fit(size)
        if index is None:
            raise PoolExhaustedError(nbytes, self._largest_free(), self.capacity, self._used)
        rng = self._free[index]
        block = Block(rng[0], nbytes, size, self._id)
        if rng[1] == size:
            del self._free[index]
        else:
            rng[0] += size
            rng[1] -= size
        self._live[block.offset] = block
        self._used += size
        self._peak = max(self._peak, self._used)
        return block

    def fits(self, nbytes: int) -> bool:
        """Whether :meth:`allocate` of ``nbytes`` would succeed without waiting: a free range
        holds it once completed copies are reclaimed."""
        self._check_open()
        _check_size("nbytes", nbytes)
        self._reclaim()
        return self._best_fit(-(-nbytes // self.alignment) * self.alignment) is not None

    def free(self, block: Block, after: CopyEvent | None = None) -> None:
        """Return ``block``; with ``after``, only once that event has completed.

        ``after`` is the event of the last copy that reads or writes the block (a
        ``torch.cuda.Event``): reusing the bytes earlier would let a new copy overwrite data a
        copy in flight still reads, or be overwritten by one still writing.

        Raises:
            ValueError: if the block is not live in this pool (double free, foreign block).
        """
        self._check_open()
        self._check_live(block)
        del self._live[block.offset]
        if after is None:
            self._release(block)
        else:
            self._pending.append((after, block))

    def view(self, block: Block, nbytes: int | None = None) -> torch.Tensor:
        """The first ``nbytes`` (default ``block.nbytes``) bytes of ``block``: a ``uint8`` [nbytes]
        view of the pool buffer (pinned if the pool is)."""
        self._check_open()
        self._check_live(block)
        n = block.nbytes if nbytes is None else nbytes
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= block.size:
            raise ValueError(f"view size must be an int in [0, {block.size}], got {n!r}")
        return self._buf[block.offset : block.offset + n]

    def stats(self) -> PoolStats:
        """Current sizes and counters (reclaims completed pending frees first)."""
        if not self.closed:
            self._reclaim()
        return PoolStats(
            capacity=self.capacity,
            used=self._used,
            peak_used=self._peak,
            free_bytes=self.capacity - self._used,
            free_ranges=len(self._free),
            largest_free=self._largest_free(),
            live_blocks=len(self._live),
            pending_blocks=len(self._pending),
            host_wait_s=self._host_wait_s,
            pinned=self.pinned,
        )

    def free_ranges(self) -> list[tuple[int, int]]:
        """The free list as sorted ``(offset, size)`` pairs (for tests and reports)."""
        return [(o, s) for o, s in self._free]

    def close(self) -> None:
        """Wait for pending frees, unregister and drop the buffer. Idempotent.

        Live blocks are abandoned; if the buffer is pinned and some are live, the current
        CUDA device is synchronized first because a copy may still be using them.
        """
        if self.closed:
            return
        self.closed = True
        try:
            while self._pending:
                event, block = self._pending.popleft()
                event.synchronize()
                self._release(block)
            if self.pinned and self._live and torch.cuda.is_initialized():
                torch.cuda.synchronize()
        finally:
            self._live.clear()
            self._buf = torch.empty(0, dtype=torch.uint8)
            self._finalizer()

    def __enter__(self) -> HostPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("HostPool is closed; create a new pool")

    def _check_live(self, block: object) -> None:
        if not isinstance(block, Block):
            raise ValueError(f"expected a Block from this pool, got {type(block).__name__}")
        if block.pool_id != self._id or self._live.get(block.offset) is not block:
            raise ValueError(
                f"block at offset {block.offset} is not live in this pool "
                "(already freed, or allocated by another pool)"
            )

    def _reclaim(self) -> None:
        # Events complete out of order across streams, so check all of them.
        if not self._pending:
            return
        waiting: deque[tuple[CopyEvent, Block]] = deque()
        for event, block in self._pending:
            if event.query():
                self._release(block)
            else:
                waiting.append((event, block))
        self._pending = waiting

    def _release(self, block: Block) -> None:
        """Insert the block's range into the free list, merging with its neighbours."""
        self._used -= block.size
        start, end = block.offset, block.offset + block.size
        i = bisect.bisect_left(self._free, [start, 0])
        if i > 0 and sum(self._free[i - 1]) == start:
            i -= 1
            start = self._free[i][0]
            del self._free[i]
        if i < len(self._free) and self._free[i][0] == end:
            end = sum(self._free[i])
            del self._free[i]
        assert i == 0 or sum(self._free[i - 1]) < start, "free ranges overlap"
        assert i == len(self._free) or self._free[i][0] > end, "free ranges overlap"
        self._free.insert(i, [start, end - start])

    def _best_fit(self, size: int) -> int | None:
        best = None
        for i, (_, s) in enumerate(self._free):
            if s >= size and (best is None or s < self._free[best][1]):
                best = i
                if s == size:
                    break
        return best

    def _largest_free(self) -> int:
        return max((s for _, s in self._free), default=0)
