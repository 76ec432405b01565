"""Sequential reads and writes that bypass the page cache (Linux O_DIRECT), for multi-gigabyte files.

A buffered write copies every byte into the page cache; the kernel then allocates, tracks, writes back and frees
those pages. For a merge that writes 24 GB on a 2-core machine, that is CPU the merge itself needs (measured with
`dd bs=16M` of 4.3 GB here: 3.24 s of system time and 6.2 s buffered, 0.36 s and 2.3 s direct). Here the bytes are
staged in aligned buffers and written with O_DIRECT, DEPTH buffers on the disk while the next one fills.

`open_direct` returns None where O_DIRECT is missing or refused (macOS, tmpfs before Linux 6.6, some network
filesystems); the caller then writes through the page cache as before. The file's last block is written whole and
the file then truncated to its exact size; durability (fsync) stays the caller's.

Reads (`open_read`, `DirectReader`) go around the page cache only for files too big for it to keep (see
`wanted_for_reading`; `LORABOX_DIRECT_READS=0` reads every base through it); what the page cache already holds of
such a file is copied from there (`Residency`).
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..errors import InputFileError

ALIGN = 4096  # O_DIRECT wants buffer addresses, file offsets and lengths aligned to the device's block size
STAGE = 16 << 20  # bytes per write
DEPTH = 3  # writes in flight while the next buffer fills (FLUX.1 merges: 1 -> 3 saved 2.4-3.1 s in three pairs)
DIRECT_MIN = 256 << 20  # smaller files are not worth it
CACHE_SHARE = 0.5  # files up to this share of the RAM are read through the page cache, which keeps them


def wanted(nbytes: int) -> bool:
    """Whether a file of `nbytes` should be written with O_DIRECT (`LORABOX_DIRECT_IO=0`: never)."""
    return nbytes >= DIRECT_MIN and os.environ.get("LORABOX_DIRECT_IO", "1") != "0"


def wanted_for_reading(nbytes: int) -> bool:
    """Whether a file of `nbytes` should be read with O_DIRECT: one too big for the page cache to keep for the next run
    (over CACHE_SHARE of the RAM; a 5 GB SDXL base on a 24 GiB machine is read again from memory by the next merge),
    unless `LORABOX_DIRECT_READS=0`.

    Why: on the 2-core machines of 2026-12 (a Firecracker guest), a thread that faults a base's mapped pages in from
    the disk is charged the wait as CPU, which the merge's two compute threads then lack. A FLUX.1 merge (23.8 GB,
    not in the page cache) took 59-61 s hashing and 43-46 s with its digest remembered through memory maps, against
    34-36 s and 23.6 s read directly (docs/benchmarks.md, seventeenth session). On an earlier machine whose virtual
    disk stalled, two direct reads in flight left the merge stalled longer than mapped reads did, and one read in
    flight 32 MB ahead (READ_DEPTH, AHEAD) ran as fast as mapped reads (eleventh session)."""
    return os.environ.get("LORABOX_DIRECT_READS", "1") != "0" and wanted(nbytes) and nbytes > CACHE_SHARE * _ram()


def _ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def aligned(nbytes: int) -> np.ndarray:
    """A uint8 buffer of `nbytes` whose address is a multiple of ALIGN."""
    raw = np.empty(nbytes + ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip:skip + nbytes]


def open_direct(path: str | os.PathLike, stage: int = STAGE) -> DirectFile | None:
    """`path` (an existing, empty file) opened for O_DIRECT writes, or None where that is not possible."""
    fd = _open_tried(path, os.O_WRONLY, lambda fd: os.pwrite(fd, aligned(ALIGN), 0))  # (overwritten later)
    return None if fd is None else DirectFile(fd, stage)


def _open_tried(path: str | os.PathLike, mode: int, probe) -> int | None:
    """`path` opened with O_DIRECT, or None where the flag is missing or refused. Filesystems may accept the flag
    and refuse the I/O, so `probe(fd)` tries one block first."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        fd = os.open(path, mode | flag)
    except OSError:
        return None
    try:
        probe(fd)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    return fd


def _pwrite_all(fd: int, buf: np.ndarray, offset: int) -> None:
    view = memoryview(buf)
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "the disk accepted no bytes")
        view, offset = view[n:], offset + n


class DirectFile:
    """Append-only O_DIRECT writer: `write` bytes, then `finish` (or `close` to abandon). Write errors (a full
    disk) are raised by the `write` or `finish` after them."""

    def __init__(self, fd: int, stage: int = STAGE, depth: int | None = None):
        depth = DEPTH if depth is None else depth
        if stage <= 0 or stage % ALIGN:
            raise ValueError(f"stage must be a positive multiple of {ALIGN}")
        self._fd = fd
        self._bufs = [aligned(stage) for _ in range(depth + 1)]
        self._cur = self._fill = self._base = 0  # buffer being filled, bytes in it, its offset in the file
        self._pool = ThreadPoolExecutor(depth, thread_name_prefix="lorabox-direct")
        self._pending: list[Future] = []  # oldest first
        self._depth = depth

    def tell(self) -> int:
        return self._base + self._fill

    def write(self, data) -> None:
        src = np.frombuffer(data, np.uint8)
        stage = len(self._bufs[0])
        while len(src):
            n = min(len(src), stage - self._fill)
            self._bufs[self._cur][self._fill:self._fill + n] = src[:n]  # numpy copies without the GIL
            self._fill += n
            src = src[n:]
            if self._fill == stage:
                self._submit(stage)

    def _submit(self, length: int) -> None:
        if len(self._pending) >= self._depth:  # the oldest write's buffer is the one filled next
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(_pwrite_all, self._fd, self._bufs[self._cur][:length], self._base))
        self._base += length
        self._cur = (self._cur + 1) % len(self._bufs)
        self._fill = 0

    def _wait(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def finish(self) -> int:
        """Write what is staged, cut the file to the bytes written, close; returns the size."""
        size = self.tell()
        try:
            if self._fill:
                padded = -(-self._fill // ALIGN) * ALIGN
                self._bufs[self._cur][self._fill:padded] = 0
                self._submit(padded)
            self._wait()
            os.ftruncate(self._fd, size)
        finally:
            self.close()
        return size

    def close(self) -> None:
        """Stop: wait for the writes on the disk (their errors are dropped: the file is being abandoned)."""
        if self._fd < 0:
            return
        try:
            self._wait()
        except OSError:
            pass
        finally:
            self._pool.shutdown(wait=True)
            os.close(self._fd)
            self._fd = -1


# -- reads ---------------------------------------------------------------------------------------------------------
READ_DEPTH = 1  # reads on the disk at once while the caller hashes and computes the ones before
RUN = 16 << 20  # consecutive tensors read together, in reads of at least this many bytes
AHEAD = 32 << 20  # bytes of reads on the disk ahead of the one in use (at least one read); why 1 and 32 MB:
# `wanted_for_reading`
READ_KEEP = 64 << 20  # idle read buffers kept for reuse (0, 64 and 192 MB ran the same on FLUX.1)


def open_reader(path: str | os.PathLike, size: int) -> DirectReader | None:
    """A `DirectReader` of `path` (`size` bytes) when it should be read around the page cache (`wanted_for_reading`)
    and can be; else None (read it buffered or mapped). The caller closes it."""
    from ..parallel import BufferPool

    fd = open_read(path) if wanted_for_reading(size) else None
    return None if fd is None else DirectReader(fd, BufferPool(keep=READ_KEEP), resident=Residency.of(path))


def open_read(path: str | os.PathLike) -> int | None:
    """A file descriptor of `path` for O_DIRECT reads, or None where that is not possible."""
    return _open_tried(path, os.O_RDONLY, lambda fd: os.preadv(fd, [aligned(ALIGN)], 0))


class DirectReader:
    """Byte ranges of a file read around the page cache, in order, READ_DEPTH at a time on background threads.

    A buffered or memory-mapped read makes the kernel allocate, fill, map and later reclaim a page-cache page for
    every 4 KB (`dd bs=16M` of a 23.8 GB file here: 11.0 s of system time and 22.6 s buffered, 0.8 s and 16.2 s
    direct). Each range lands in an aligned buffer of `pool` (`parallel.BufferPool`), which hands it out again once
    nothing holds a view of it, so the pages are not zeroed again either. `fd` is owned: `close` closes it."""

    def __init__(self, fd: int, pool, depth: int = READ_DEPTH, resident: Residency | None = None):
        self._fd, self._pool, self._resident = fd, pool, resident
        self._ex = ThreadPoolExecutor(depth, thread_name_prefix="lorabox-direct-read")
        self.from_cache = 0  # bytes asked for that were copied from the page cache rather than read from the disk

    def submit(self, start: int, end: int) -> Future:
        """Start reading bytes [start, end); the future's result is a uint8 array of them. A file shorter than
        `end` raises EOFError there."""
        lo = start - start % ALIGN
        hi = -(-end // ALIGN) * ALIGN
        buf = self._pool.aligned(hi - lo, ALIGN)
        return self._ex.submit(self._read, buf, lo, start, end)

    def read_in_order(self, ranges: list[tuple[int, int]], ahead: int):
        """The bytes of each (start, end) of `ranges`, in order, each read started up to `ahead` bytes (and at
        least one read) before it is needed."""
        pending, queued, nxt = [], 0, 0
        for start, end in ranges:
            while nxt < len(ranges) and (not pending or queued < ahead):
                pending.append(self.submit(*ranges[nxt]))
                queued += ranges[nxt][1] - ranges[nxt][0]
                nxt += 1
            queued -= end - start
            yield pending.pop(0).result()

    def _read(self, buf: np.ndarray, lo: int, start: int, end: int) -> np.ndarray:
        """The aligned range from `lo` into `buf`: the part at its start that the page cache holds copied from there
        (`Residency`), the rest read around it."""
        view = memoryview(buf)
        cached = min(self._resident.prefix(lo, len(view)), len(view)) if self._resident is not None else 0
        got = _fill(self._resident.fd, view[:cached], lo) if cached else 0
        self.from_cache += max(0, min(lo + got, end) - start)  # of the bytes asked for
        if got == cached:  # else the file ended
            got += _fill(self._fd, view[got:], lo + got)
        if lo + got < end:
            raise EOFError(f"the file ends at byte {lo + got}, before byte {end}")
        return buf[start - lo:end - lo]

    def close(self) -> None:
        if self._fd < 0:
            return
        self._ex.shutdown(wait=True, cancel_futures=True)
        os.close(self._fd)
        self._fd = -1
        if self._resident is not None:
            self._resident.close()


def _fill(fd: int, view: memoryview, offset: int) -> int:
    """Read into `view` from `offset`: how many bytes, fewer only at the end of the file."""
    got = 0
    while got < len(view):
        want = min(len(view) - got, 1 << 30)  # Linux moves at most 2 GB per call
        n = os.preadv(fd, [view[got:got + want]], offset + got)
        got += n
        if n < want:  # the end of the file (an O_DIRECT read cannot go on from an unaligned offset anyway)
            break
    return got


class Residency:
    """Which stretches of a file the page cache already holds, asked with mincore(2) on a read-only map of it that is
    never touched (so asking reads nothing), and a buffered descriptor to copy them from.

    A base that a copy, a download or an earlier run left partly in memory is then read from there, and only the rest
    from the disk: a direct read of pages the cache holds would wait for the disk for nothing. Linux reports the page
    cache this way only to a process that could write the file (its owner, say); otherwise every page reads as absent
    and everything is read directly, as without this. The buffered descriptor reads without read-ahead
    (POSIX_FADV_RANDOM): a page evicted since it was asked about costs one small read, not the file's next
    megabytes in the cache."""

    def __init__(self, fd: int, mapping, libc):
        self.fd, self._map, self._libc = fd, mapping, libc
        self._address = np.frombuffer(mapping, np.uint8, count=1).ctypes.data  # (the array, and its hold, go now)

    @classmethod
    def of(cls, path: str | os.PathLike) -> Residency | None:
        """None where the file cannot be mapped or mincore is not there (not Linux): read everything directly."""
        fd = -1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, AttributeError, ValueError):
            if fd >= 0:
                os.close(fd)
            return None
        return cls(fd, mapping, libc)

    def prefix(self, offset: int, length: int) -> int:
        """How many bytes from `offset` (page-aligned) the page cache holds without a gap, in whole pages, at most
        `length` rounded up to a page."""
        length = min(length, len(self._map) - offset)
        if length <= 0 or offset % mmap.PAGESIZE:
            return 0
        vec = np.empty(-(-length // mmap.PAGESIZE), np.uint8)
        if self._libc.mincore(self._address + offset, length, vec.ctypes.data) != 0:
            return 0
        absent = np.flatnonzero((vec & 1) == 0)
        return (len(vec) if absent.size == 0 else int(absent[0])) * mmap.PAGESIZE

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)


def read_runs(reader: DirectReader, items: list, size: int, path, hasher=None):
    """(item, its bytes as a uint8 view of a read's buffer) for each (item, offset, nbytes) of `items` (in file
    order), read with `reader`: consecutive items grouped into reads of RUN bytes or more, AHEAD bytes of reads on
    the disk ahead of the one in use, the first from byte 0 (the header). With a `hasher` the reads cover every byte
    of the file, gaps and the tail up to `size` included, and each goes through it in order; without, stretches of
    RUN bytes or more that no item needs are not read."""
    whole = hasher is not None
    runs, start, end, group = [], 0, 0, []
    for item, offset, nbytes in items:
        if not whole and offset - end >= RUN:
            if group:
                runs.append((start, end, group))
            start, group = offset, []
        group.append((item, offset, nbytes))
        end = offset + nbytes
        if end - start >= RUN:
            runs.append((start, end, group))
            start, group = end, []
    if whole:
        end = max(end, size)
    if group or end > start:
        runs.append((start, end, group))

    bufs = reader.read_in_order([(start, end) for start, end, _ in runs], AHEAD)
    for start, _, group in runs:
        try:
            buf = next(bufs)
        except EOFError as exc:
            raise InputFileError(f"{path}: {exc}: truncated while being read.", hint="Download it again.") from None
        if whole:
            hasher.update(buf)
        for item, offset, nbytes in group:
            yield item, buf[offset - start:offset - start + nbytes]
