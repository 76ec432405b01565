"""sha256 of large files, remembered between runs.

Merging several LoRAs into one base, one run after another, is the everyday workflow; each run records the base's
sha256, which costs 16 CPU-seconds for a 24 GB FLUX.1 file on the 2-core machine (sha256 runs at 1.1-1.6 GB/s on one
core). A digest is remembered for a file of at least CACHE_MIN_BYTES, keyed by device and inode, together with its
size, mtime and ctime in nanoseconds. Any write to the file changes its ctime (which no user call can set back), so
a changed file is hashed again. A digest is only remembered when the file's stamp was the same before and after
it was hashed.

The cache is one JSON file, `sha256.json`, in `$LORABOX_CACHE_DIR` (an empty value turns the cache off), else in
`$XDG_CACHE_HOME/lorabox`, else in `~/.cache/lorabox`. A cache that cannot be read is ignored, and one that cannot
be written is skipped: the digest is then computed each time, as it would be without a cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .files import cache_dir, write_cache

PENDING = "?" * 64  # a digest's placeholder in a header written before the file has been read through
CACHE_MIN_BYTES = 64 << 20  # smaller files hash in well under a second: not worth an entry
MAX_ENTRIES = 512
VERSION = 1


def cache_file() -> Path | None:
    folder = cache_dir()
    return None if folder is None else folder / "sha256.json"


def _key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}"


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _entries(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def known(st: os.stat_result) -> str | None:
    """The remembered sha256 of the file `st` describes (os.stat/os.fstat of it), or None."""
    cache = cache_file()
    if cache is None or st.st_size < CACHE_MIN_BYTES:
        return None
    entry = _entries(cache).get(_key(st))
    if not isinstance(entry, dict) or entry.get("stamp") != _stamp(st):
        return None
    digest = entry.get("sha256")
    return digest if isinstance(digest, str) and len(digest) == 64 else None


def remember(path, digest: str, before: os.stat_result, after: os.stat_result) -> None:
    """Remember `digest` for `path`, if the file did not change while it was hashed (stat before and after)."""
    cache = cache_file()
    if cache is None or after.st_size < CACHE_MIN_BYTES or _key(before) != _key(after) or _stamp(before) != _stamp(after):
        return
    files = _entries(cache)
    files[_key(after)] = {"path": str(Path(path).resolve()), "stamp": _stamp(after), "sha256": digest,
                          "at": time.time()}
    if len(files) > MAX_ENTRIES:  # keep the newest
        files = dict(sorted(files.items(), key=lambda kv: kv[1].get("at", 0))[-MAX_ENTRIES:])
    write_cache(cache, json.dumps({"version": VERSION, "files": files}).encode())


def file_sha256(path) -> str:
    """The hex sha256 of a whole file (remembered for large files, see the module's notes)."""
    import hashlib

    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        digest = known(before)
        if digest is not None:
            return digest
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
        digest = h.hexdigest()
        remember(path, digest, before, os.fstat(f.fileno()))
    return digest


class WhileReading:
    """The sha256 of a file a merge reads front to back anyway: the remembered digest when there is one (`hasher`
    is then None), else `hasher` is to be fed every byte of the file in order; `finish()` gives the digest and
    remembers it. Spares a first merge a read of the whole base before it starts. `in_order=False` (the merge
    reads the file out of order): no `hasher`, and `finish()` reads the file once more to hash it."""

    def __init__(self, path, fd: int, in_order: bool = True):
        self.path, self.fd = path, fd
        self.before = os.fstat(fd)
        self.digest = known(self.before)
        self.hasher = hashlib.sha256() if self.digest is None and in_order else None

    def finish(self) -> str:
        if self.digest is None and self.hasher is None:
            self.digest = file_sha256(self.path)
        elif self.hasher is not None:
            self.digest = self.hasher.hexdigest()
            remember(self.path, self.digest, self.before, os.fstat(self.fd))
            self.hasher = None
        return self.digest
