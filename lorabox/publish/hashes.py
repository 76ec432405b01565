"""The hashes model sites and UIs identify a file by, from one streaming pass (hashlib and zlib only).

Definitions (FIELD_NOTES §5; civitai/model-scanner `Tasks/HashTask.cs`, kohya `train_util.py`):

| key | what | spelling |
|---|---|---|
| `sha256` | whole file | 64 hex, upper case (CivitAI's) |
| `autov1` | sha256 of bytes [0x100000, 0x110000), None below 2 MiB (the scanner's rule) | 8 hex, upper |
| `autov2` | the first 10 of `sha256` | 10 hex, upper |
| `autov3` / `autov3_full` | sha256 of everything after the safetensors header (`8 + header_len` to the end) | 12 / 64 hex, upper |
| `sshs_model_hash` | kohya's `addnet_hash_safetensors`: the same bytes as AutoV3 | 64 hex, lower (as kohya writes it) |
| `crc32` | CRC-32 (IEEE, zlib's), as `crc32`, 7-Zip and rhash print it | 8 hex, upper |
| `crc32_civitai` | the same CRC in .NET's little-endian byte order, as CivitAI's scanner stores it | 8 hex, upper |

AutoV3 and `sshs_model_hash` depend only on the tensor bytes, so they survive metadata edits; sha256, AutoV1,
AutoV2 and CRC32 change with every header write, so hash after the last one.
"""
from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path
from typing import Callable

from ..errors import InputFileError
from ..io.safetensors import _check_path, read_header

CHUNK = 4 << 20                     # bounded memory: one 4 MiB buffer, reused
AUTOV1_AT, AUTOV1_LEN = 0x100000, 0x10000
AUTOV1_MIN_SIZE = 2 * 0x100000      # the scanner returns null for smaller files
AUTOV3_SHORT = 12

Progress = Callable[[int, int], None]


def payload_offset(path: str | os.PathLike) -> int | None:
    """Where the tensor bytes start (`8 + header_len`) if `path` is a valid safetensors file, else None."""
    try:
        return read_header(path)[2]
    except InputFileError:
        return None


def _stream(path: Path, start: int, sink: Callable[[int, memoryview], None], progress: Progress | None) -> None:
    """Call `sink(position, chunk)` for consecutive chunks from `start` to the end of the file."""
    total = path.stat().st_size
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        while True:
            n = f.readinto(buf)
            if not n:
                break
            sink(pos, view[:n])
            pos += n
            if progress is not None:
                progress(pos, total)


def _window(pos: int, chunk: memoryview, begin: int, end: int) -> memoryview:
    """The part of `chunk` (which starts at file position `pos`) that lies in [begin, end)."""
    lo, hi = max(begin - pos, 0), min(end - pos, len(chunk))
    return chunk[lo:hi] if lo < hi else chunk[:0]


def file_hashes(path: str | os.PathLike, *, progress: Progress | None = None) -> dict[str, str | None]:
    """Every hash in the table above, reading the file once.

    Any file can be hashed (a pickle checkpoint is only read, never loaded); AutoV3 and `sshs_model_hash`
    are None for a file that is not a valid safetensors file.

    Args:
        path: the file.
        progress: called as `progress(bytes_done, bytes_total)` after each chunk.
    Returns:
        {"sha256", "autov1", "autov2", "autov3", "autov3_full", "sshs_model_hash", "crc32", "crc32_civitai"}.
    Example:
        >>> file_hashes("lora.safetensors")["autov2"]
        'A1B2C3D4E5'
    """
    path = Path(path)
    _check_path(path)
    size = path.stat().st_size
    offset = payload_offset(path)
    whole, payload = hashlib.sha256(), hashlib.sha256()
    autov1 = bytearray()
    crc = 0

    def sink(pos: int, chunk: memoryview) -> None:
        nonlocal crc
        whole.update(chunk)
        crc = zlib.crc32(chunk, crc)
        autov1.extend(_window(pos, chunk, AUTOV1_AT, AUTOV1_AT + AUTOV1_LEN))
        if offset is not None:
            payload.update(_window(pos, chunk, offset, size))

    _stream(path, 0, sink, progress)
    sha = whole.hexdigest().upper()
    tensor_hex = payload.hexdigest() if offset is not None else None
    return {
        "sha256": sha,
        "autov1": hashlib.sha256(autov1).hexdigest()[:8].upper() if size >= AUTOV1_MIN_SIZE else None,
        "autov2": sha[:10],
        "autov3": tensor_hex[:AUTOV3_SHORT].upper() if tensor_hex else None,
        "autov3_full": tensor_hex.upper() if tensor_hex else None,
        "sshs_model_hash": tensor_hex,
        "crc32": f"{crc:08X}",
        "crc32_civitai": crc.to_bytes(4, "little").hex().upper(),
    }


def tensor_data_sha256(path: str | os.PathLike, *, progress: Progress | None = None) -> str:
    """Lower-case sha256 of the tensor bytes (everything after the header): `modelspec.hash_sha256` is "0x" + this.

    Raises InputFileError for a file that is not a valid safetensors file.
    """
    path = Path(path)
    _, _, offset = read_header(path)
    digest = hashlib.sha256()
    _stream(path, offset, lambda pos, chunk: digest.update(chunk), progress)
    return digest.hexdigest()
