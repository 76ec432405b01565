"""File helpers every reader and writer shares: atomic outputs (a temporary file beside the target, renamed
when complete, removed otherwise) and exact positional reads."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import InputFileError


def cache_dir() -> Path | None:
    """lorabox's cache folder (remembered digests, compiled loops): `$LORABOX_CACHE_DIR` (an empty value turns
    caching off: None), else `$XDG_CACHE_HOME/lorabox`, else `~/.cache/lorabox`. Not created here."""
    env = os.environ.get("LORABOX_CACHE_DIR")
    if env is not None:
        return Path(env) if env else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorabox"


def write_cache(path: Path, data: bytes) -> None:
    """Replace the cache file `path` with `data` (a temporary file beside it, then rename). A cache that cannot be
    written (a read-only or full home, a folder that cannot be made) is skipped: it only saves time."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_beside(path)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            discard(tmp)


def temporary_beside(path: Path) -> Path:
    """A new empty file in `path`'s folder, named `.<name>.*.partial` (same filesystem, so the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def umask_mode(full: int = 0o666) -> int:
    """The mode `open` (0o666) or `mkdir` (0o777) gives a new file or folder under this process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return full & ~mask


def commit(tmp: Path, path: Path, *, mode: int | None = None) -> None:
    """Give the finished temporary file (or folder) the mode `open` would have (mkstemp makes 0600, mkdtemp 0700),
    or `mode` (the old file's, when a file is replaced in place), and move it in place."""
    os.chmod(tmp, umask_mode(0o777 if tmp.is_dir() else 0o666) if mode is None else mode)
    os.replace(tmp, path)


def discard(tmp: Path) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def pread_exact(fd: int, nbytes: int, offset: int, *, path, what: str, into=None):
    """Exactly `nbytes` from `offset`, or an InputFileError naming the file and what was being read: a fresh
    bytearray, or the first `nbytes` of the writable buffer `into` (a recycled array: no fresh pages to fault in)."""
    buf = bytearray(nbytes) if into is None else memoryview(into).cast("B")[:nbytes]
    view, got = memoryview(buf), 0
    while got < nbytes:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise InputFileError(f"{path}: ends inside {what}: truncated.", hint="Download it again.")
        got += n
    return buf


class AtomicWriter:
    """A streaming writer whose output appears only complete. Subclasses write to `self._tmp`, count written
    tensors in `self._next` against `self._expect`, and implement `_finish()` (flush, fsync, close handles)
    and `_release()` (close handles). `close()` commits; `abort()`, or any exception in the `with` block or
    in `close()` itself, removes the temporary file."""

    path: Path
    _tmp: Path
    _expect: list
    _next: int = 0
    what = "stream writer"

    def _finish(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self._next != len(self._expect):
            raise ValueError(f"{self.what}: {len(self._expect) - self._next} tensors were never written")
        self._finish()
        commit(self._tmp, self.path)

    def abort(self) -> None:
        try:
            self._release()
        finally:
            discard(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
        return False


class Writeback:
    """Call after each write to a buffered file: once every EVERY bytes it starts writing back the bytes written so
    far (POSIX_FADV_DONTNEED on Linux submits the dirty pages of the range for writeback, and drops those already
    clean). Without it the kernel waits until a tenth of RAM is dirty, and the fsync at the end then waits for
    gigabytes (2.4 s of a 5 GB SDXL merge); the output also stays out of the page cache, where it would push out
    the base being read."""

    EVERY = 64 << 20

    def __init__(self, f):
        self._f = f
        self._synced = self._synced_before = 0

    def __call__(self) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        pos = self._f.tell()
        if pos - self._synced < self.EVERY:
            return
        self._f.flush()
        os.posix_fadvise(self._f.fileno(), self._synced_before, pos - self._synced_before, os.POSIX_FADV_DONTNEED)
        self._synced_before, self._synced = self._synced, pos
