"""Row-chunk parallelism for numpy work. numpy releases the GIL in its kernels, so plain threads scale on the
cores this process may use; results never depend on the thread count (each chunk writes its own rows)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable


def cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run_chunks(work: Callable[[int], None], starts: Iterable[int], threads: int | None = None) -> None:
    """Call `work(start)` for every start, on up to `threads` threads (default: `cpus()`); re-raises the first
    error. The caller's `work` writes disjoint parts of a shared output."""
    starts = list(starts)
    threads = cpus() if threads is None else threads
    if threads <= 1 or len(starts) <= 1:
        for s in starts:
            work(s)
        return
    with ThreadPoolExecutor(min(threads, len(starts))) as pool:
        for _ in pool.map(work, starts):
            pass
