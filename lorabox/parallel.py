"""Threads for streaming work: row-chunk parallelism for numpy, read-ahead and write-behind stages.

Row chunks: numpy releases the GIL in its kernels, so plain threads scale on the
cores this process may use; results never depend on the thread count (each chunk writes its own rows)."""
from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable


def cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


READ_AHEAD = WRITE_BEHIND = 192 << 20  # a merge's bytes of inputs read ahead / outputs waiting to be written


@contextlib.contextmanager
def timed(totals: dict, key: str):
    """Add the seconds spent in the `with` block to `totals[key]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        totals[key] = totals.get(key, 0.0) + time.perf_counter() - start


def timed_items(items: Iterable, totals: dict, key: str):
    """`items`, adding the seconds spent waiting for each one to `totals[key]`."""
    items = iter(items)
    while True:
        with timed(totals, key):
            item = next(items, timed)  # `timed`: a sentinel no iterable yields
        if item is timed:
            return
        yield item


def run_chunks(work: Callable[[int], None], starts: Iterable[int], threads: int | None = None,
               pool: ThreadPoolExecutor | None = None) -> None:
    """Call `work(start)` for every start, on up to `threads` threads (default: `cpus()`), or on `pool`'s threads
    when given; re-raises the first error. The caller's `work` writes disjoint parts of a shared output."""
    starts = list(starts)
    threads = cpus() if threads is None else threads
    if threads <= 1 or len(starts) <= 1:
        for s in starts:
            work(s)
        return
    with contextlib.nullcontext(pool) if pool is not None else ThreadPoolExecutor(min(threads, len(starts))) as ex:
        for _ in ex.map(work, starts):
            pass


def prefetch(items: Iterable, budget: int, size: Callable[[object], int]):
    """Iterate `items` on a background thread, keeping up to `budget` bytes (by `size`) of items ready ahead of
    the consumer (always at least one). The producer's exception is raised in the consumer; leaving the loop early
    stops the producer."""
    ready: queue.Queue = queue.Queue()
    cv, held, stop = threading.Condition(), [0], threading.Event()

    def produce():
        try:
            for item in items:
                n = size(item)
                with cv:
                    while held[0] and held[0] + n > budget and not stop.is_set():
                        cv.wait()
                    if stop.is_set():
                        return
                    held[0] += n
                ready.put((item, n))
            ready.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            ready.put(exc)

    thread = threading.Thread(target=produce, daemon=True, name="lorabox-read")
    thread.start()
    try:
        while True:
            job = ready.get()
            if job is None:
                return
            if isinstance(job, BaseException):
                raise job
            item, n = job
            with cv:
                held[0] -= n
                cv.notify_all()
            yield item
    finally:
        stop.set()
        with cv:
            cv.notify_all()
        thread.join()


class Behind:
    """Run `work(item)` on a background thread, in order, with up to `budget` bytes of items waiting (always at
    least one). `put` re-raises a failure of the worker; leaving the `with` block waits for the queue, or, on an
    exception, drops what is queued and waits only for the item in progress."""

    def __init__(self, work: Callable[[object], None], budget: int):
        self._work, self._budget = work, budget
        self._jobs: queue.Queue = queue.Queue()
        self._cv, self._held = threading.Condition(), 0
        self._error: BaseException | None = None
        self._abort = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="lorabox-write")
        self._thread.start()

    def put(self, item, nbytes: int) -> None:
        with self._cv:
            while self._held and self._held + nbytes > self._budget and self._error is None:
                self._cv.wait()
            if self._error is not None:
                raise self._error
            self._held += nbytes
        self._jobs.put((item, nbytes))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            item, n = job
            if self._error is None and not self._abort:
                try:
                    self._work(item)
                except BaseException as exc:  # noqa: BLE001 - re-raised in put / __exit__
                    self._error = exc
            with self._cv:
                self._held -= n
                self._cv.notify_all()

    def __enter__(self) -> "Behind":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._abort = exc_type is not None
        self._jobs.put(None)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error


class BufferPool:
    """Large output arrays, recycled once nothing else holds them.

    A fresh multi-megabyte numpy array is fresh memory: the kernel zeroes every page on first touch (6 of 131 CPU
    seconds of a 24 GB merge). The pool keeps the arrays it handed out; one whose only remaining holder is the pool
    (its views are gone: written and dropped downstream) is handed out again for a request that fits. At most
    `keep` bytes of idle arrays are kept; arrays under `small` bytes come from numpy as usual."""

    def __init__(self, keep: int = 0 << 20, small: int = 1 << 20):
        self._arrays: list = []
        self._keep, self._small = keep, small
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype):
        import numpy as np

        dtype = np.dtype(dtype)
        n = dtype.itemsize
        for s in shape:
            n *= s
        return self._take(n, 1).view(dtype).reshape(shape)

    def holds(self, a) -> bool:
        """Whether the array `a` lies in memory this pool hands out."""
        import numpy as np

        with self._lock:
            return any(np.shares_memory(a, b) for b in self._arrays)

    def aligned(self, nbytes: int, align: int):
        """A uint8 array of `nbytes` whose address is a multiple of `align` (for O_DIRECT reads)."""
        return self._take(nbytes, align)

    def _take(self, n: int, align: int):
        import numpy as np

        need = n + align - 1  # room to start at an aligned address
        if n < self._small:
            buf = np.empty(need, np.uint8)
        else:
            with self._lock:
                idle = [a for a in self._arrays if sys.getrefcount(a) <= 3]  # the list, `a`, getrefcount's argument
                fits = [a for a in idle if a.nbytes >= need]
                if fits:
                    buf = min(fits, key=lambda a: a.nbytes)
                else:
                    buf = np.empty(need, np.uint8)
                    spare, drop = sum(a.nbytes for a in idle), set()
                    for a in sorted(idle, key=lambda a: a.nbytes):  # smallest idle arrays go first
                        if spare <= self._keep:
                            break
                        drop.add(id(a))
                        spare -= a.nbytes
                    self._arrays = [a for a in self._arrays if id(a) not in drop]
                    self._arrays.append(buf)
                del idle, fits
        skip = -buf.ctypes.data % align
        return buf[skip:skip + n]
