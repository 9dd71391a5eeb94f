"""OffloadEngine on CUDA: stream/event ordering under injected delays, and pinned memory lifetime.

``torch.cuda._sleep`` stalls one stream so that any missing wait turns into a data race that
the comparisons see; each run draws which streams sleep and for how long.
"""

from __future__ import annotations

import random

import pytest
import torch

from hbmplan.allocator import HostPool, OffloadEngine, TensorMeta, rebuild

pytestmark = pytest.mark.gpu

CYCLES = 2_000_000  # roughly a millisecond: far longer than the copies below


def _sleep(stream, cycles):
    if cycles:
        with torch.cuda.stream(stream):
            torch.cuda._sleep(cycles)


def _race_runs(runs: int, seed: int) -> int:
    """Offload/reload under random delays; returns the number of mismatching elements."""
    rng = random.Random(seed)
    dev = torch.device("cuda", torch.cuda.current_device())
    cur = torch.cuda.current_stream(dev)
    side = torch.cuda.Stream(dev)
    mismatches = torch.zeros((), dtype=torch.int64, device=dev)  # updated on cur only
    with torch.cuda.stream(side):
        side_mismatches = torch.zeros((), dtype=torch.int64, device=dev)  # on side only
    sizes = [rng.randrange(1, 1 << 18) for _ in range(runs * 4)]
    for run in range(runs):
        k = rng.randint(1, 4)
        numels = [sizes[run * 4 + i] for i in range(k)]
        # the pool is exactly full with the k storages: a later offload can only reuse a block
        # that a reload is reading, so it must wait for that reload's event
        capacity = sum(-(-4 * n // 512) * 512 for n in numels)
        with HostPool(capacity, pin=True) as pool, OffloadEngine(pool, dev) as eng:
            wants, handles, metas = [], [], []
            for n in numels:
                want = torch.randn(n, device=dev)
                _sleep(cur, rng.randrange(CYCLES))  # producer still running at offload time
                x = torch.full((n,), float("nan"), device=dev)
                x.copy_(want)
                view = x[rng.randrange(min(n, 5)) :]
                _sleep(eng.copy_stream, rng.randrange(CYCLES))  # the D2H starts late
                handles.append(eng.offload(view))
                metas.append(TensorMeta.of(view))
                wants.append(want[view.storage_offset() :])
                del x, view
                for _ in range(3):  # reuse of the freed device memory would clobber the source
                    torch.empty(n, device=dev).fill_(-1.0)
            order = list(range(k))[::-1]
            eng.start_reload([handles[i] for i in order], depth=rng.randint(0, k))
            for i in order:
                _sleep(eng.prefetch_stream, rng.randrange(CYCLES))  # the H2D lands late
                got = rebuild(eng.fetch(handles[i]), metas[i])
                mismatches += (got != wants[i]).sum()
                # Offloaded from another stream, nothing orders this D2H after the reload
                # above except the pool: it may only reuse that block once the H2D event is done.
                with torch.cuda.stream(side):
                    again = torch.randn(numels[i], device=dev)
                    _sleep(eng.prefetch_stream, rng.randrange(CYCLES))
                    h = eng.offload(again)
                    back = rebuild(eng.fetch(h), TensorMeta.of(again))
                    side_mismatches += (back != again).sum()
                mismatches += (got != wants[i]).sum()
            eng.synchronize()
            assert pool.stats().used == 0
    torch.cuda.synchronize()
    return int(mismatches) + int(side_mismatches)


def test_no_races_under_random_delays():
    assert _race_runs(runs=200, seed=0) == 0


def test_race_harness_detects_a_missing_producer_wait(monkeypatch):
    """Negative control: with the copy stream not waiting on the producer, copies go stale."""
    monkeypatch.setattr(torch.cuda.Stream, "wait_stream", lambda self, other: None)
    assert _race_runs(runs=10, seed=1) > 0


def test_timings_and_gbps_are_reported():
    dev = torch.device("cuda", torch.cuda.current_device())
    with HostPool(64 << 20, pin=True) as pool, OffloadEngine(pool, dev) as eng:
        t = torch.randn(8 << 20, device=dev)  # 32 MiB
        eng.fetch(eng.offload(t))
        torch.cuda.synchronize()
        s = eng.stats()
        assert s.bytes_offloaded == s.bytes_prefetched == 32 << 20
        assert 0.1 < s.d2h_gbps < 1000 and 0.1 < s.h2d_gbps < 1000
        assert s.exposed_wait_s > 0  # fetched on demand: the consumer waited for the copy


def test_fetch_on_another_stream_is_refused():
    dev = torch.device("cuda", torch.cuda.current_device())
    with HostPool(1 << 20, pin=True) as pool, OffloadEngine(pool, dev) as eng:
        h = eng.offload(torch.ones(100, device=dev))
        eng.prefetch(h)
        with torch.cuda.stream(torch.cuda.Stream(dev)), pytest.raises(RuntimeError, match="stream"):
            eng.fetch(h)


def test_pinned_pool_is_released_on_close():
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize()
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    pool = HostPool(48 << 20, pin=True)
    block = pool.allocate(1 << 20)
    view = pool.view(block)  # keeps the buffer's memory alive past close()
    assert pool.pinned and view.is_pinned()
    # the pool never goes through torch's caching pinned allocator (power-of-two, cached)
    assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) == before
    with OffloadEngine(pool, dev) as eng:
        for _ in range(4):
            eng.offload(torch.randn(1 << 20, device=dev))
    assert pool.stats().live_blocks == 1
    pool.free(block)
    pool.close()
    assert not view.is_pinned(), "close() must unregister the pages"
    assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) == before
