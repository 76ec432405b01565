"""Streaming helpers: the output buffer pool never hands out memory that is still held; stage timers."""
import time

import numpy as np

from lorabox.parallel import BufferPool, timed, timed_items


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


def test_timed_items_adds_the_waits_for_each_item_and_nothing_of_the_loop_body():
    def slow():
        for i in range(3):
            time.sleep(0.05)
            yield i

    totals = {}
    seen = []
    for i in timed_items(slow(), totals, "reads"):
        with timed(totals, "work"):
            time.sleep(0.02)
        time.sleep(0.1)  # neither stage
        seen.append(i)
    assert seen == [0, 1, 2]
    assert 0.15 <= totals["reads"] < 0.42 and 0.06 <= totals["work"] < 0.3  # sleeps are at least as long as asked
    assert list(timed_items([None, 0], totals, "none")) == [None, 0]  # falsy items are items, not the end
