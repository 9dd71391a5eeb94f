"""HostPool: sub-allocation invariants (hypothesis state machine), deferred frees, RAM check."""

from __future__ import annotations

import itertools
import pickle
from collections import namedtuple

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

import hbmplan.allocator.pool as pool_mod
from hbmplan.allocator import HostMemoryError, HostPool, PoolExhaustedError

MiB = 1 << 20


class FakeEvent:
    """A copy event the test completes by hand (query) or that the pool forces (synchronize)."""

    def __init__(self) -> None:
        self.done = False
        self.syncs = 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.syncs += 1
        self.done = True


class PoolMachine(RuleBasedStateMachine):
    blocks = Bundle("blocks")

    @initialize(
        alignment=st.sampled_from([1, 8, 64, 512]),
        units=st.integers(1, 64),
    )
    def make_pool(self, alignment, units):
        self.pool = HostPool(units * 512, alignment=alignment, pin=False)
        self.live = {}  # id(block) -> (block, pattern)
        self.pending = []  # (event, block, pattern)
        self.seed = 0

    def _fill(self, block):
        self.seed += 1
        g = torch.Generator().manual_seed(self.seed)
        data = torch.randint(0, 256, (block.nbytes,), dtype=torch.uint8, generator=g)
        self.pool.view(block).copy_(data)
        return data

    def _settle(self):
        # blocks whose events the pool forced (or the test completed) are free again
        self.pending = [p for p in self.pending if not p[0].done]

    @rule(target=blocks, nbytes=st.integers(1, 40 * 512))
    def allocate(self, nbytes):
        size = -(-nbytes // self.pool.alignment) * self.pool.alignment
        try:
            block = self.pool.allocate(nbytes)
        except PoolExhaustedError as e:
            self._settle()
            assert not self.pending, "gave up while freed blocks were still pending"
            largest = max(self._gaps(), default=0)
            assert largest < size, f"a free gap of {largest} bytes could hold {size}"
            assert e.requested == nbytes and e.largest_free == largest
            for number in (nbytes, largest, self.pool.capacity):
                assert str(number) in str(e)
            return multiple()
        self._settle()
        assert block.size == size and block.nbytes == nbytes
        self.live[id(block)] = (block, self._fill(block))
        return block

    @rule(block=consumes(blocks), deferred=st.booleans())
    def free(self, block, deferred):
        _, pattern = self.live.pop(id(block))
        if deferred:
            event = FakeEvent()
            self.pool.free(block, after=event)
            self.pending.append((event, block, pattern))
        else:
            self.pool.free(block)

    @precondition(lambda self: self.pending)
    @rule(index=st.integers(0, 100))
    def complete_event(self, index):
        self.pending[index % len(self.pending)][0].done = True

    def _gaps(self):
        ends, gaps, pos = sorted((b.offset, b.size) for b, _ in self.live.values()), [], 0
        for offset, size in ends:
            gaps.append(offset - pos)
            pos = offset + size
        return [*gaps, self.pool.capacity - pos]

    @invariant()
    def blocks_are_disjoint_aligned_and_intact(self):
        held = [(b, p) for b, p in self.live.values()]
        held += [(b, p) for e, b, p in self.pending if not e.done]
        spans = sorted((b.offset, b.offset + b.size) for b, _ in held)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, "two blocks overlap"
        for b, pattern in held:
            assert b.offset % self.pool.alignment == 0
            assert b.offset >= 0 and b.offset + b.size <= self.pool.capacity
            view = self.pool._buf[b.offset : b.offset + b.nbytes]
            assert view.data_ptr() % self.pool.alignment == 0
            assert torch.equal(view, pattern), "block data changed while it was held"

    @invariant()
    def free_list_is_sorted_coalesced_and_accounted(self):
        st_ = self.pool.stats()  # reclaims completed frees first
        ranges = self.pool.free_ranges()
        assert len(ranges) == st_.free_ranges
        for (o1, s1), (o2, _) in itertools.pairwise(ranges):
            assert o1 + s1 < o2, "adjacent free ranges were not merged"
        assert sum(s for _, s in ranges) == st_.free_bytes == self.pool.capacity - st_.used
        assert st_.peak_used >= st_.used

    def teardown(self):
        for b, _ in list(self.live.values()):
            self.pool.free(b, after=FakeEvent())
        for e, _, _ in self.pending:
            e.done = True
        for e in [e for e, _ in self.pool._pending]:
            e.done = True
        assert self.pool.stats().used == 0  # stats() reclaims the completed frees
        assert self.pool.free_ranges() == [(0, self.pool.capacity)]
        self.pool.close()


TestPoolMachine = PoolMachine.TestCase
# more and longer sequences than the profile's default: the pool is cheap to exercise
TestPoolMachine.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)


def test_completed_events_are_reclaimed_without_waiting():
    pool = HostPool(4 * 512, alignment=512, pin=False)
    a, b = pool.allocate(2048), None
    ev = FakeEvent()
    pool.free(a, after=ev)
    assert pool.stats().pending_blocks == 1
    ev.done = True
    b = pool.allocate(2048)
    assert ev.syncs == 0 and b.offset == 0
    assert pool.stats().host_wait_s == 0.0


def test_exhaustion_waits_on_oldest_pending_only_as_needed():
    pool = HostPool(3 * 512, alignment=512, pin=False)
    blocks = [pool.allocate(512) for _ in range(3)]
    events = [FakeEvent() for _ in blocks]
    for b, e in zip(blocks, events, strict=True):
        pool.free(b, after=e)
    again = pool.allocate(512)
    assert again.offset == blocks[0].offset
    assert [e.syncs for e in events] == [1, 0, 0]
    assert pool.stats().pending_blocks == 2


def test_pending_block_is_not_reused_while_space_elsewhere():
    pool = HostPool(2 * 512, alignment=512, pin=False)
    a = pool.allocate(512)
    ev = FakeEvent()
    pool.free(a, after=ev)
    b = pool.allocate(512)
    assert b.offset != a.offset and ev.syncs == 0


def test_exhausted_error_names_the_numbers():
    pool = HostPool(2048, alignment=512, pin=False)
    pool.allocate(1000)
    with pytest.raises(PoolExhaustedError) as info:
        pool.allocate(1537)
    msg = str(info.value)
    assert "1537" in msg and "1024" in msg and "2048" in msg
    assert isinstance(info.value, MemoryError)
    assert str(pickle.loads(pickle.dumps(info.value))) == msg
    ram = HostMemoryError(10, 5, 2)
    assert str(pickle.loads(pickle.dumps(ram))) == str(ram)


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "10"])
def test_bad_sizes_are_rejected(bad):
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        HostPool(bad, pin=False)
    pool = HostPool(1024, pin=False)
    with pytest.raises(ValueError, match="nbytes"):
        pool.allocate(bad)


def test_alignment_must_be_power_of_two():
    with pytest.raises(ValueError, match="power of two, got 48"):
        HostPool(1024, alignment=48, pin=False)


def test_double_free_and_foreign_block():
    pool, other = HostPool(2048, pin=False), HostPool(2048, pin=False)
    a = pool.allocate(100)
    pool.free(a)
    with pytest.raises(ValueError, match="not live"):
        pool.free(a)
    b = pool.allocate(100)
    pool.free(b, after=FakeEvent())
    with pytest.raises(ValueError, match="not live"):
        pool.free(b)
    with pytest.raises(ValueError, match="not live"):
        other.free(pool.allocate(100))
    with pytest.raises(ValueError, match="Block"):
        pool.free((0, 100))


def test_view_bounds_and_alignment():
    pool = HostPool(4096, alignment=512, pin=False)
    b = pool.allocate(700)
    assert pool.view(b).shape == (700,) and pool.view(b, 1024).shape == (1024,)
    assert pool.view(b).data_ptr() % 512 == 0
    with pytest.raises(ValueError, match="1025"):
        pool.view(b, 1025)


def test_close_is_idempotent_and_final():
    pool = HostPool(4096, pin=False)
    b = pool.allocate(10)
    pool.free(b, after=(ev := FakeEvent()))
    pool.close()
    pool.close()
    assert ev.syncs == 1
    with pytest.raises(RuntimeError, match="closed"):
        pool.allocate(10)


def test_stats_track_peak_and_ranges():
    pool = HostPool(4 * 512, alignment=512, pin=False)
    a, b, c = (pool.allocate(512) for _ in range(3))
    pool.free(b)
    s = pool.stats()
    assert (s.used, s.peak_used, s.free_ranges, s.live_blocks) == (1024, 1536, 2, 2)
    pool.free(a)
    pool.free(c)
    assert pool.stats().free_ranges == 1 and pool.stats().peak_used == 1536


VM = namedtuple("VM", "total available")


def test_host_ram_check_refuses_before_allocating(monkeypatch):
    monkeypatch.setattr(pool_mod.psutil, "virtual_memory", lambda: VM(64 * MiB, 10 * MiB))

    def no_alloc(*args, **kwargs):
        raise AssertionError("allocated host memory before checking RAM")

    with monkeypatch.context() as m:
        m.setattr(pool_mod.torch, "empty", no_alloc)
        with pytest.raises(HostMemoryError) as info:
            HostPool(8 * MiB, pin=False, ram_margin=4 * MiB)  # 8 MiB > 10 - 4 MiB
        assert isinstance(info.value, MemoryError)
        assert str(8 * MiB + 512) in str(info.value) and str(10 * MiB) in str(info.value)
        with pytest.raises(HostMemoryError):  # default margin is at least 2 GiB
            HostPool(1 * MiB, pin=False)
    assert HostPool(8 * MiB, pin=False, ram_margin=0).capacity == 8 * MiB


def test_default_margin():
    assert pool_mod.default_ram_margin(8 << 30) == 2 << 30
    assert pool_mod.default_ram_margin(100 << 30) == 10 << 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_pin_without_cuda_is_refused():
    with pytest.raises(ValueError, match="pin=True"):
        HostPool(1024, pin=True)
    assert HostPool(1024).pinned is False
