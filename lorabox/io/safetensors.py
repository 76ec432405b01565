"""safetensors without torch: a validating reader (header first, tensors memory-mapped) and an atomic writer.

The format is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape, data_offsets}},
optional "__metadata__" of strings), then the tensor bytes.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import InputFileError, OutputError
from . import direct
from .direct import STAGE, open_direct
from .files import AtomicWriter, Writeback, commit, discard, temporary_beside
from ..tensor import Tensor, storage_dtype

MAX_HEADER = 100 * 1024 * 1024


def _check_path(path: Path) -> None:
    if not path.exists():
        raise InputFileError(f"{path}: no such file.", hint="Check the path.")
    if path.is_dir():
        raise InputFileError(f"{path}: is a directory, not a file.", hint="Give the .safetensors file inside it.")


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, str], int]:
    """Validate the container and return (tensor entries, metadata, offset of the data)."""
    path = Path(path)
    _check_path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        looks_safetensors = len(head) == 9 and head[8:9] == b"{"
        if not looks_safetensors and (head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05")):
            raise InputFileError(
                f"{path}: is a pickle checkpoint (.ckpt/.pt/.bin), which can run code when loaded.",
                hint="lorabox reads only .safetensors; convert it with a tool you trust first.")
        if len(head) < 8:
            raise InputFileError(f"{path}: is {size} bytes, too short to be a safetensors file.")
        (n,) = struct.unpack("<Q", head[:8])
        if n > min(size - 8, MAX_HEADER):
            raise InputFileError(f"{path}: the safetensors header claims {n} bytes but the file has {size}: "
                                 f"truncated or not a safetensors file.", hint="Download it again.")
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path}: the safetensors header is not valid JSON ({exc}): corrupt file.",
                             hint="Download it again.") from None
    metadata = header.pop("__metadata__", None) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InputFileError(f"{path}: metadata values must be strings.")
    end = 0
    for name, entry in header.items():
        try:
            begin, stop = entry["data_offsets"]
            width = storage_dtype(entry["dtype"]).itemsize
            count = int(np.prod(entry["shape"], dtype=np.int64))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputFileError(f"{path}: tensor {name!r} has a malformed header entry ({exc}).") from None
        if stop - begin != count * width or begin > stop:
            raise InputFileError(f"{path}: tensor {name!r} has {stop - begin} bytes for shape {entry['shape']}.")
        end = max(end, stop)
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], name) for name, e in header.items())
    for (_, stop, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < stop:
            raise InputFileError(f"{path}: tensors {a!r} and {b!r} share bytes, which safetensors forbids: corrupt "
                                 f"file.", hint="Download it again, or re-save it with the safetensors library.")
    if 8 + n + end > size:
        raise InputFileError(f"{path}: tensors need {8 + n + end} bytes but the file has {size}: truncated.",
                             hint="Download it again.")
    return header, metadata, 8 + n


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors (memory-mapped, read-only) and the metadata."""
    header, metadata, offset = read_header(path)
    tensors: dict[str, Tensor] = {}
    if not header:
        return tensors, metadata
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    for name, entry in header.items():
        begin, stop = entry["data_offsets"]
        arr = np.frombuffer(buf, dtype=storage_dtype(entry["dtype"]), count=(stop - begin) //
                            storage_dtype(entry["dtype"]).itemsize, offset=offset + begin)
        tensors[name] = Tensor(arr.reshape(entry["shape"]), entry["dtype"])
    return tensors, metadata


def release(arrays) -> None:
    """Let the kernel take back this process's pages of tensors that `read_tensors` mapped (a LoRA's factors once
    merged): they stop counting in its resident memory, and are read again from the file (or the page cache) if
    touched again. Arrays that are not views of a map are left alone."""
    for arr in arrays:
        while isinstance(arr.base, np.ndarray):
            arr = arr.base
        view = arr.base
        if not isinstance(view, memoryview) or not isinstance(view.obj, mmap.mmap) or not arr.nbytes:
            continue
        start = arr.ctypes.data - np.frombuffer(view, np.uint8, count=1).ctypes.data
        lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the tensor only
        hi = (start + arr.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo and hasattr(view.obj, "madvise"):
            view.obj.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(out: str | os.PathLike, inputs: list, *, overwrite: bool = False) -> Path:
    out = Path(out)
    for src in inputs:
        if same_file(out, src):
            raise OutputError(f"{out}: is also an input; lorabox never overwrites its inputs.",
                              hint="Choose another output path with -o.")
    if out.is_dir():
        raise OutputError(f"{out}: is a directory.", hint="Give a file name.")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists.", hint="Pass --overwrite or choose another path with -o.")
    if not out.parent.exists():
        raise OutputError(f"{out.parent}: no such directory.")
    return out


def write_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None, *,
                  durable: bool = True) -> None:
    """Write a safetensors file atomically: a temporary file in the same folder, then rename.

    The destination never holds a partial file. `durable` also fsyncs before the rename, so the file
    survives a power cut; small outputs that are cheap to redo may skip it.
    """
    path = Path(path)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, t in tensors.items():
        n = t.nbytes
        header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = temporary_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for t in tensors.values():
                f.write(np.ascontiguousarray(t.array).data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        commit(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def _header_bytes(header: dict) -> bytes:
    """The JSON header as written: compact, padded with spaces to a multiple of 8 so the tensor bytes after it
    stay 8-byte aligned (tensor offsets are relative to the end of the header, so they never change)."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def rewrite_metadata(src: str | os.PathLike, dst: str | os.PathLike, metadata: dict[str, str], *,
                     progress=None, chunk: int = 8 << 20) -> None:
    """Write `src` to `dst` with its `__metadata__` replaced by `metadata`: tensor entries unchanged, tensor bytes
    copied verbatim in chunks (never loaded whole). Atomic: a temporary file beside `dst`, then rename, so
    `dst` may be `src` itself (the one in-place write lorabox makes; the file's mode is kept).

    `progress(done, total)` is called with bytes of tensor data copied.
    """
    src, dst = Path(src), Path(dst)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise OutputError(f"{dst}: metadata keys and values must be strings.")
    entries, _, offset = read_header(src)
    if dst.is_dir():
        raise OutputError(f"{dst}: is a directory.", hint="Give a file name.")
    header = ({"__metadata__": dict(metadata)} if metadata else {}) | entries
    raw = _header_bytes(header)
    total = src.stat().st_size - offset
    tmp = temporary_beside(dst)
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            fout.write(struct.pack("<Q", len(raw)))
            fout.write(raw)
            fin.seek(offset)
            buf = bytearray(min(chunk, max(total, 1)))
            done = 0
            while n := fin.readinto(buf):
                fout.write(memoryview(buf)[:n])
                done += n
                if progress is not None:
                    progress(done, total)
            if done != total:
                raise InputFileError(f"{src}: changed size while being copied.", hint="Run again.")
            fout.flush()
            os.fsync(fout.fileno())
        commit(tmp, dst, mode=src.stat().st_mode & 0o7777 if same_file(src, dst) else None)
    except BaseException:
        discard(tmp)
        raise


class StreamWriter(AtomicWriter):
    """Write a safetensors file tensor by tensor: the header is laid out from shapes and dtypes known in advance,
    then each tensor is appended in order, so memory does not grow with the file. Atomic: a temporary file in the
    target folder, renamed on `close()`; any exception (an interrupt, a full disk) removes it.

    Metadata values may hold placeholders (`reserve`) that are overwritten in place at the end with a value of
    the same length, e.g. a digest computed while streaming.

    Outputs of `direct.DIRECT_MIN` bytes or more go around the page cache (O_DIRECT, `io/direct.py`) where the
    filesystem allows it (`LORABOX_DIRECT_IO=0` turns that off); otherwise, or for smaller files, writes are
    buffered and written back as they go (`files.Writeback`).
    """

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._expect = []
        for name, dtype, shape in entries:
            n = int(np.prod(shape, dtype=np.int64)) * storage_dtype(dtype).itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._expect.append((name, dtype, tuple(shape), n))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._header = raw
        self.size = 8 + len(raw) + offset
        self._tmp = temporary_beside(self.path)
        self._f = open(self._tmp, "wb")
        try:
            self._direct = open_direct(self._tmp, self.STAGE) if direct.wanted(self.size) else None
            out = self._f if self._direct is None else self._direct
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
        except BaseException:
            self._f.close()
            discard(self._tmp)
            raise
        self._next = 0
        self._writeback = Writeback(self._f)

    STAGE = STAGE

    def write(self, name: str, t: Tensor) -> None:
        want_name, dtype, shape, n = self._expect[self._next]
        if name != want_name or t.dtype != dtype or t.shape != shape:
            raise ValueError(f"stream writer: expected {want_name} {dtype} {list(shape)}, got {name} {t.dtype} {list(t.shape)}")
        data = np.ascontiguousarray(t.array).data
        if self._direct is not None:
            self._direct.write(data)
        else:
            self._f.write(data)
            self._writeback()
        self._next += 1

    def fill(self, placeholder: str, value: str) -> None:
        """Replace a metadata placeholder with a value of the same length; the header is written again on close."""
        old, new = placeholder.encode(), value.encode()
        if len(old) != len(new):
            raise ValueError("placeholder and value must have the same length")
        at = self._header.index(old)
        self._header = self._header[:at] + new + self._header[at + len(new):]

    def _finish(self) -> None:
        if self._direct is not None:
            self._direct.finish()
        self._f.flush()
        os.pwrite(self._f.fileno(), self._header, 8)  # with filled placeholders (after direct writes: coherent)
        os.fsync(self._f.fileno())
        self._f.close()

    def _release(self) -> None:
        if self._direct is not None:
            self._direct.close()
        self._f.close()
