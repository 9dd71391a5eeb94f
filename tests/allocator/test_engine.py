"""OffloadEngine on CPU: the synchronous path exercises every piece of bookkeeping."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hbmplan.allocator import (
    HostPool,
    OffloadEngine,
    PoolExhaustedError,
    TensorMeta,
    rebuild,
)


@pytest.fixture
def pool():
    p = HostPool(1 << 20, pin=False)
    yield p
    p.close()


@pytest.fixture
def engine(pool):
    e = OffloadEngine(pool, "cpu")
    yield e
    e.close()


def _views():
    """Several storages; the first is seen through four views, some non-contiguous/offset."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, generator=g)
    y = torch.randint(-(2**40), 2**40, (33,), generator=g)
    z = torch.randn(5, 7, generator=g).to(torch.bfloat16)
    b = torch.rand(17, generator=g) > 0.5
    return [x, x.t(), x[1:, ::3], x.view(-1)[7:19].view(3, 4), y[5:], z.t()[2:], b]


def test_round_trip_views_sharing_storages(engine, pool):
    views = _views()
    expected = [v.clone() for v in views]
    metas = [TensorMeta.of(v) for v in views]
    handles, index = {}, []  # one handle per storage, like the capture's dedup
    for v in views:
        ptr = v.untyped_storage().data_ptr()
        if ptr not in handles:
            handles[ptr] = engine.offload(v)
        index.append(ptr)
    assert len(handles) == 4
    first_views = {p: v for p, v in zip(index, views, strict=True)}.values()
    assert engine.stats().bytes_offloaded == sum(v.untyped_storage().nbytes() for v in first_views)
    for v in views:  # the host copy is a copy, not an alias
        v.zero_() if v.dtype != torch.bool else v.fill_(False)
    storages = {ptr: engine.fetch(h) for ptr, h in handles.items()}
    for ptr, meta, want in zip(index, metas, expected, strict=True):
        got = rebuild(storages[ptr], meta)
        assert got.stride() == meta.stride and got.storage_offset() == meta.storage_offset
        assert torch.equal(got, want)
    # views of one storage share the reloaded storage again
    assert rebuild(storages[index[0]], metas[1]).data_ptr() == storages[index[0]].data_ptr()
    assert engine.live_handles == 0 and pool.stats().used == 0


_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int8, torch.int64, torch.bool]


@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    dtype=st.sampled_from(_DTYPES),
    transpose=st.booleans(),
    start=st.integers(0, 3),
    step=st.integers(1, 3),
)
def test_round_trip_random_views(shape, dtype, transpose, start, step):
    base = (torch.arange(int(torch.tensor(shape).prod())) * 37 % 101).to(dtype).reshape(shape)
    v = base.transpose(0, -1) if transpose else base
    v = v[start % v.shape[0] :: step]
    want, meta = v.clone(), TensorMeta.of(v)
    with HostPool(1 << 16, pin=False) as pool, OffloadEngine(pool, "cpu") as engine:
        h = engine.offload(v)
        base.zero_()
        assert torch.equal(rebuild(engine.fetch(h), meta), want)
        assert pool.stats().used == 0


@pytest.mark.parametrize("depth", [0, 1, 2, 5, 9])
def test_start_reload_keeps_depth_in_flight_in_order(engine, depth):
    handles = [engine.offload(torch.full((8 + i,), float(i))) for i in range(6)]
    order = handles[::-1]  # reverse layer order, as in the prompt backward
    engine._log.clear()
    engine.start_reload(order, depth)
    prefetched = [i for op, i in engine._log if op == "prefetch"]
    assert prefetched == [h.id for h in order[:depth]]
    for k, h in enumerate(order):
        assert torch.equal(
            rebuild(engine.fetch(h), TensorMeta(torch.float32, (8 + h.id,), (1,), 0)),
            torch.full((8 + h.id,), float(h.id)),
        )
        prefetched = [i for op, i in engine._log if op == "prefetch"]
        fetched = [i for op, i in engine._log if op == "fetch"]
        assert prefetched == [x.id for x in order[: min(k + 1 + depth, len(order))]]
        assert fetched == [x.id for x in order[: k + 1]]
        assert len(set(prefetched) - set(fetched)) == min(depth, len(order) - k - 1)


def test_exposed_wait_counts_only_on_demand_reloads(engine):
    big = [torch.randn(4096) for _ in range(3)]
    handles = [engine.offload(t) for t in big]
    engine.start_reload(handles, depth=3)
    for h in handles:
        engine.fetch(h)
    assert engine.stats().exposed_wait_s == 0.0
    engine.fetch(engine.offload(big[0]))
    s = engine.stats()
    assert s.exposed_wait_s > 0.0
    assert (s.d2h_copies, s.h2d_copies) == (4, 4)
    assert s.bytes_prefetched == s.bytes_offloaded == 4 * 4096 * 4
    assert s.d2h_gbps > 0 and s.h2d_gbps > 0


def hs_val(i):
    return torch.full((4,), float(i))


def test_out_of_order_fetch_under_reload(engine):
    hs = [engine.offload(torch.full((4,), float(i))) for i in range(4)]
    engine.start_reload(hs, depth=1)
    assert torch.equal(rebuild(engine.fetch(hs[2]), TensorMeta.of(torch.zeros(4))), hs_val(2))
    for i in (0, 1, 3):
        assert torch.equal(rebuild(engine.fetch(hs[i]), TensorMeta.of(torch.zeros(4))), hs_val(i))


def test_double_fetch_foreign_and_closed_errors(pool):
    engine, other = OffloadEngine(pool, "cpu"), OffloadEngine(pool, "cpu")
    h = engine.offload(torch.ones(3))
    engine.fetch(h)
    with pytest.raises(ValueError, match=f"handle {h.id} was already fetched"):
        engine.fetch(h)
    with pytest.raises(ValueError, match="already fetched"):
        engine.start_reload([h], 1)
    with pytest.raises(ValueError, match="of this engine"):
        other.fetch(engine.offload(torch.ones(3)))
    with pytest.raises(ValueError, match="depth"):
        engine.start_reload([], -1)
    h2 = engine.offload(torch.ones(3))
    with pytest.raises(ValueError, match="same handle twice"):
        engine.start_reload([h2, h2], 1)
    engine.close()
    engine.close()
    for call in (lambda: engine.fetch(h2), lambda: engine.offload(torch.ones(1))):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    other.close()
    assert pool.stats().used == 0


def test_wrong_device_is_rejected(engine):
    with pytest.raises(ValueError, match="meta"):
        engine.offload(torch.empty(3, device="meta"))


def test_close_returns_pool_to_fully_free(pool):
    engine = OffloadEngine(pool, "cpu")
    hs = [engine.offload(torch.randn(100 + i)) for i in range(8)]
    engine.prefetch(hs[0])
    engine.fetch(hs[1])
    engine.start_reload(hs[2:5], depth=2)
    engine.discard(hs[7])
    assert pool.stats().live_blocks == 6
    engine.close()
    s = pool.stats()
    assert s.used == 0 and s.live_blocks == 0 and pool.free_ranges() == [(0, pool.capacity)]
    assert all(h.state in ("fetched", "discarded") for h in hs)


def test_exhaustion_leaves_no_state_and_close_recovers():
    with HostPool(4096, pin=False) as pool:
        engine = OffloadEngine(pool, "cpu")
        engine.offload(torch.zeros(512))  # 2048 bytes
        before = (engine.live_handles, pool.stats().used, engine.stats().bytes_offloaded)
        with pytest.raises(PoolExhaustedError, match="requested 4000 bytes"):
            engine.offload(torch.zeros(1000))
        after = (engine.live_handles, pool.stats().used, engine.stats().bytes_offloaded)
        assert before == after
        engine.close()
        assert pool.stats().used == 0 and pool.free_ranges() == [(0, 4096)]


def test_empty_storage_round_trip(engine, pool):
    t = torch.empty(0, 5)
    h = engine.offload(t)
    assert h.block is None and pool.stats().used == 0
    assert rebuild(engine.fetch(h), TensorMeta.of(t)).shape == (0, 5)


def test_autograd_through_capture_is_unchanged():
    """Saved tensors swapped for reloaded copies give the same gradients (torch.equal)."""
    from hbmplan.runtime.capture import SavedTensorCapture

    def run(offload):
        torch.manual_seed(0)
        w = torch.randn(16, 16, requires_grad=True)
        x = torch.randn(4, 16)
        cap = SavedTensorCapture(exclude=[w])
        with cap.phase("A"):
            y = torch.tanh(x @ w).sigmoid().sum()
        with HostPool(1 << 16, pin=False) as pool, OffloadEngine(pool, "cpu") as eng:
            if offload:
                handles = [cap.offload(rec, eng) for rec in cap.live_records()]
                assert cap.nbytes == 0 and eng.live_handles == len(handles) > 0
                eng.start_reload(handles[::-1], depth=1)
            y.backward()
            assert eng.live_handles == 0
        cap.release()
        return w.grad

    assert torch.equal(run(True), run(False))
