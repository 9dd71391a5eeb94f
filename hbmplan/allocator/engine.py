"""Offload device storages to a :class:`HostPool` and bring them back ahead of their use.

The unit is a storage; views of it are rebuilt on the reload with ``views.rebuild``. On CUDA
copies run on two side streams ordered by events; on CPU the same code copies synchronously.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from hbmplan.allocator.pool import Block, HostPool
from hbmplan.allocator.views import storage_bytes

__all__ = ["OffloadEngine", "OffloadHandle", "OffloadStats"]

HandleState = Literal["offloaded", "prefetched", "fetched", "discarded"]


class _HostEvent:
    """Stands in for ``torch.cuda.Event`` on CPU, where copies finish before record() returns."""

    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: _HostEvent) -> float:
        return (end.t - self.t) * 1e3


Event = torch.cuda.Event | _HostEvent


class OffloadHandle:
    """One offloaded storage of ``nbytes`` bytes. Returned by :meth:`OffloadEngine.offload`.

    ``state``: ``"offloaded"`` (host copy issued), ``"prefetched"`` (H2D issued),
    ``"fetched"`` (handed back; the handle is spent) or ``"discarded"``.
    """

    __slots__ = ("_d2h_end", "_dst", "_h2d", "_home", "block", "engine_id", "id", "nbytes", "state")

    def __init__(self, engine_id: int, id: int, nbytes: int, block: Block | None):
        self.engine_id, self.id, self.nbytes, self.block = engine_id, id, nbytes, block
        self.state: HandleState = "offloaded"
        self._d2h_end: Event | None = None  # the host copy is complete
        self._h2d: tuple[Event, Event] | None = None  # (start, end) of the reload
        self._dst: torch.Tensor | None = None  # reloaded uint8 [nbytes] device bytes
        self._home: torch.cuda.Stream | None = None  # stream _dst was allocated on

    def __repr__(self) -> str:
        return f"OffloadHandle(id={self.id}, nbytes={self.nbytes}, state={self.state!r})"


@dataclass(frozen=True)
class OffloadStats:
    """Counters of an :class:`OffloadEngine`. Bytes are storage bytes; times in seconds.

    ``d2h_s``/``h2d_s`` sum per-copy times from CUDA events (CPU: wall time of the copies) for
    the copies whose events have completed. ``exposed_wait_s`` is the time consumers stalled
    for reloads: on CUDA, how long the current stream reached each fetch's wait before its H2D
    finished; on CPU, the wall time of copies a fetch had to issue itself. ``host_wait_s`` is
    host time the pool spent synchronizing events to make room.
    """

    bytes_offloaded: int
    bytes_prefetched: int
    d2h_copies: int
    h2d_copies: int
    d2h_s: float
    h2d_s: float
    exposed_wait_s: float
    host_wait_s: float

    @property
    def d2h_gbps(self) -> float:
        return self.bytes_offloaded / self.d2h_s / 1e9 if self.d2h_s > 0 else 0.0

    @property
    def h2d_gbps(self) -> float:
        return self.bytes_prefetched / self.h2d_s / 1e9 if self.h2d_s > 0 else 0.0


_engine_ids = itertools.count()


class OffloadEngine:
    """Copies storages of ``device`` to ``pool`` and back.

    Stream and event rules (CUDA; on CPU every copy is synchronous and the rules are moot):

    * D2H runs on ``copy_stream`` after it waits on the *current* stream (looked up per call):
      the kernels producing the tensor were queued there and may not have run yet.
    * The handle keeps the device storage alive until the D2H end event completes, then drops
      it in :meth:`poll`: freeing it earlier would let the caching allocator hand the memory to
      a kernel on the current stream while the copy still reads it. (No ``record_stream``.)
    * H2D runs on ``prefetch_stream`` after it waits on the handle's D2H end event (the host
      bytes must be written) and on the current stream (the destination is allocated there and
      may reuse memory that queued kernels still use).
    * :meth:`fetch` makes the current stream wait on the H2D end event before it may read, and
      frees the host block with ``after=`` that event so no D2H overwrites bytes still being read.
      The destination belongs to the stream current at prefetch time, so fetch must run on it.

    Device memory of an offloaded storage is released once no one else references it and a
    later engine call (``offload``, ``fetch``, ``poll``) sees its D2H complete: call
    :meth:`poll` where a phase has no further offloads. Not thread-safe; autograd's device
    thread may call :meth:`fetch` while the main thread waits in ``backward()``.
    """

    def __init__(self, pool: HostPool, device: torch.device | str | int):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {device}")
        self.pool, self.device, self._cuda = pool, device, device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self._cuda else None
        self.prefetch_stream = torch.cuda.Stream(device) if self._cuda else None
        self._id, self._ids = next(_engine_ids), itertools.count()
        self._live: dict[int, OffloadHandle] = {}
        self._holding: deque[tuple[Event, torch.UntypedStorage]] = deque()  # D2H sources
        self._reload: deque[OffloadHandle] = deque()
        self._depth = 0
        self._timings: list[tuple[str, int, Event, Event]] = []  # (dir, bytes, start, end)
        self._waits: list[tuple[Event, Event]] = []  # (consumer arrives, H2D end)
        self._bytes = {"d2h": 0, "h2d": 0}
        self._count = {"d2h": 0, "h2d": 0}
        self._secs = {"d2h": 0.0, "h2d": 0.0}
        self._exposed_s = 0.0
        self._log: list[tuple[str, int]] = []  # ("offload" | "prefetch" | "fetch", handle id)
        self.closed = False

    # -- copies --------------------------------------------------------------------------------
    def offload(self, t: torch.Tensor | torch.UntypedStorage) -> OffloadHandle:
        """Copy the whole storage of ``t`` (``t.untyped_storage().nbytes()`` bytes, every view
        of it included) into a pool block; returns at once on CUDA.

        The caller may drop ``t``; it must not write it in place before the copy completes.

        Raises:
            ValueError: if ``t`` is not on this engine's device.
            PoolExhaustedError: if the pool cannot hold the storage.
        """
        self._check_open()
        storage = t.untyped_storage() if isinstance(t, torch.Tensor) else t
        if storage.device != self.device:
            raise ValueError(f"tensor is on {storage.device}, this engine offloads {self.device}")
        self.poll()
        n = storage.nbytes()
        h = OffloadHandle(self._id, next(self._ids), n, self.pool.allocate(n) if n else None)
        if n:
            cur = self._current()
            if cur is not None:
                self.copy_stream.wait_stream(cur)
            with self._on(self.copy_stream):
                start = self._record()
                self.pool.view(h.block).copy_(storage_bytes(storage), non_blocking=self._cuda)
                h._d2h_end = self._record()
            self._holding.append((h._d2h_end, storage))
            self._account("d2h", n, start, h._d2h_end)
        self._live[h.id] = h
        self._log.append(("offload", h.id))
        return h

    def prefetch(self, handle: OffloadHandle) -> None:
        """Start the H2D copy of ``handle`` into a new ``uint8`` [nbytes] device buffer.

        No-op if already prefetched. Raises ``ValueError`` if fetched or discarded.
        """
        self._check_handle(handle)
        if handle.state == "prefetched":
            return
        cur = self._current()
        dst = torch.empty(handle.nbytes, dtype=torch.uint8, device=self.device)
        if handle.nbytes:
            if cur is not None:
                self.prefetch_stream.wait_stream(cur)
                self.prefetch_stream.wait_event(handle._d2h_end)
            with self._on(self.prefetch_stream):
                start = self._record()
                dst.copy_(self.pool.view(handle.block), non_blocking=self._cuda)
                end = self._record()
            handle._h2d = (start, end)
            self._account("h2d", handle.nbytes, start, end)
        handle._dst, handle._home, handle.state = dst, cur, "prefetched"
        self._log.append(("prefetch", handle.id))

    def fetch(self, handle: OffloadHandle) -> torch.UntypedStorage:
        """The storage of ``handle`` back on the device (``nbytes`` bytes), safe to read on the
        current stream. Prefetches first if needed; the handle is spent afterwards.

        If ``handle`` was declared to :meth:`start_reload`, also tops up the next ``depth``
        declared handles (their reloads then belong to this fetch's current stream).
        """
        self._check_handle(handle)
        self.poll()
        on_demand = handle.state == "offloaded"
        t0 = time.perf_counter()
        self.prefetch(handle)
        if on_demand and not self._cuda:
            self._exposed_s += time.perf_counter() - t0
        cur = self._current()
        if cur is not None and handle._home != cur:
            raise RuntimeError(
                f"handle {handle.id} was prefetched on stream {handle._home} but fetched on "
                f"{cur}; its memory belongs to the former, so fetch on the same stream"
            )
        if self._reload and self._reload[0] is handle:  # fetches follow the declared order
            self._reload.popleft()
            self._top_up()
        elif handle in self._reload:
            self._reload.remove(handle)
            self._top_up()
        end = handle._h2d[1] if handle._h2d else None
        if cur is not None and end is not None:
            arrive = self._record()
            cur.wait_event(end)
            self._waits.append((arrive, end))
        if handle.block is not None:
            self.pool.free(handle.block, after=end if self._cuda else None)
        storage = handle._dst.untyped_storage()
        self._drop(handle, "fetched")
        self._log.append(("fetch", handle.id))
        return storage

    def start_reload(self, handles: Iterable[OffloadHandle], depth: int) -> None:
        """Declare the order of the coming fetches and prefetch the first ``depth`` handles;
        each later :meth:`fetch` tops up so that ``depth`` queued handles stay in flight.

        ``depth`` bounds the extra device memory: the reloads issued ahead of their use.
        """
        self._check_open()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be a non-negative int, got {depth!r}")
        order = list(handles)
        if len({h.id for h in order}) != len(order):
            raise ValueError("start_reload got the same handle twice")
        for h in order:
            self._check_handle(h)
        self._reload, self._depth = deque(order), depth
        self._top_up()

    def discard(self, handle: OffloadHandle) -> None:
        """Forget ``handle`` without fetching it (an abandoned graph); frees its block."""
        self._check_handle(handle)
        end = handle._h2d[1] if handle._h2d else handle._d2h_end
        if self._cuda and handle._h2d is not None:
            handle._home.wait_event(end)  # _dst may be reused on its stream once the H2D is done
        if handle.block is not None:
            self.pool.free(handle.block, after=end if self._cuda else None)
        with contextlib.suppress(ValueError):
            self._reload.remove(handle)
        self._drop(handle, "discarded")

    # -- bookkeeping ---------------------------------------------------------------------------
    def poll(self) -> None:
        """Release device storages whose D2H copies have completed (FIFO on one stream)."""
        while self._holding and self._holding[0][0].query():
            self._holding.popleft()

    def wait_offloaded(self, handles: Iterable[OffloadHandle]) -> None:
        """Block the host until the D2H copies of ``handles`` are complete, then release their
        device storages: bounds the device bytes held by copies in flight (offload lag)."""
        for h in handles:
            if h._d2h_end is not None:
                h._d2h_end.synchronize()
        self.poll()

    def synchronize(self) -> None:
        """Wait for every issued copy, then release what they held."""
        for s in (self.copy_stream, self.prefetch_stream):
            if s is not None:
                s.synchronize()
        self.poll()

    def stats(self) -> OffloadStats:
        """Counters so far; copies whose events are still pending are not yet timed."""
        pending: list[tuple[str, int, Event, Event]] = []
        for d, _n, start, end in self._timings:
            if end.query():
                self._secs[d] += start.elapsed_time(end) / 1e3
            else:
                pending.append((d, _n, start, end))
        self._timings = pending
        waits = []
        for arrive, end in self._waits:
            if arrive.query() and end.query():
                self._exposed_s += max(0.0, arrive.elapsed_time(end) / 1e3)
            else:
                waits.append((arrive, end))
        self._waits = waits
        return OffloadStats(
            bytes_offloaded=self._bytes["d2h"],
            bytes_prefetched=self._bytes["h2d"],
            d2h_copies=self._count["d2h"],
            h2d_copies=self._count["h2d"],
            d2h_s=self._secs["d2h"],
            h2d_s=self._secs["h2d"],
            exposed_wait_s=self._exposed_s,
            host_wait_s=self.pool.stats().host_wait_s,
        )

    @property
    def live_handles(self) -> int:
        """Handles offloaded and neither fetched nor discarded."""
        return len(self._live)

    def close(self) -> None:
        """Wait for the side streams, drop every handle and free its block. Idempotent, and
        safe after a failed step; the pool itself stays open (its owner closes it)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.synchronize()
        finally:
            for h in list(self._live.values()):
                if h.block is not None and not self.pool.closed:
                    self.pool.free(h.block)
                self._drop(h, "discarded")
            self._holding.clear()
            self._reload.clear()

    def __enter__(self) -> OffloadEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------
    def _current(self) -> torch.cuda.Stream | None:
        return torch.cuda.current_stream(self.device) if self._cuda else None

    def _on(self, stream: torch.cuda.Stream | None):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _record(self) -> Event:
        if not self._cuda:
            return _HostEvent()
        event = torch.cuda.Event(enable_timing=True)
        event.record()  # on the current stream: the side stream inside _on(...)
        return event

    def _account(self, direction: str, n: int, start: Event, end: Event) -> None:
        self._bytes[direction] += n
        self._count[direction] += 1
        self._timings.append((direction, n, start, end))

    def _top_up(self) -> None:
        for h in itertools.islice(self._reload, self._depth):
            self.prefetch(h)

    def _drop(self, handle: OffloadHandle, state: HandleState) -> None:
        handle._dst = handle._home = handle._h2d = handle._d2h_end = None
        handle.block, handle.state = None, state
        self._live.pop(handle.id, None)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("OffloadEngine is closed; its handles can no longer be fetched")

    def _check_handle(self, handle: object) -> None:
        self._check_open()
        if not isinstance(handle, OffloadHandle) or handle.engine_id != self._id:
            raise ValueError(f"expected an OffloadHandle of this engine, got {handle!r}")
        if handle.state in ("fetched", "discarded"):
            raise ValueError(f"handle {handle.id} was already {handle.state}; fetch it once")
