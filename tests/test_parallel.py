"""Streaming helpers: the output buffer pool never hands out memory that is still held."""
import numpy as np

from lorabox.parallel import BufferPool


def test_buffer_pool_reuses_only_released_arrays():
    pool = BufferPool(keep=64 << 20, small=1 << 10)
    a = pool.empty((512, 512), np.float32)  # 1 MiB
    a[:] = 1.0
    b = pool.empty((512, 512), np.float32)
    assert not np.shares_memory(a, b)  # `a` is still held
    view = a[10:20]
    del a
    c = pool.empty((512, 512), np.float32)
    assert not np.shares_memory(c, view)  # a view keeps its array out of the pool
    del view
    d = pool.empty((256, 512), np.float32)  # fits in the released first array: reused, not fresh memory
    assert len(pool._arrays) == 3 and any(np.shares_memory(d, x) for x in pool._arrays)
    assert d.shape == (256, 512) and d.dtype == np.float32 and d.flags.c_contiguous and d.flags.writeable
    tiny = pool.empty((4,), np.float64)
    assert not any(np.shares_memory(tiny, x) for x in pool._arrays)


def test_buffer_pool_drops_idle_arrays_beyond_its_budget():
    pool = BufferPool(keep=3 << 20, small=1 << 10)
    held = [pool.empty((n << 19,), np.uint8) for n in (4, 3, 2, 2, 2, 2)]  # smallest not first: dropped by identity
    assert len(pool._arrays) == 6
    del held
    big = pool.empty((8 << 20,), np.uint8)  # none fits: a new array, and idle ones beyond 3 MiB are let go
    assert 0 < sum(x.nbytes for x in pool._arrays if not np.shares_memory(x, big)) <= 3 << 20
    assert big.nbytes == 8 << 20
