"""Checking many files: expand folders, fan out over processes, keep input order, summarise.

Each worker checks whole files (a LoRA is small; the per-file work is parsing keys and scanning tensors), so
the pool is fed file paths in chunks and results come back in input order as they finish. Workers are forked
after the key-map tables are loaded, so no worker parses a table again.
"""
from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from .checks import Base, check_file
from .findings import GRADES, FileReport

# what a folder scan picks up: LoRAs, and the pickle files that must be refused rather than ignored
SCANNED_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def expand(paths: list[str | os.PathLike]) -> list[Path]:
    """Files as given, and every LoRA-like file under each folder (sorted, recursive)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in SCANNED_SUFFIXES and f.is_file())
        else:
            out.append(p)
    return out


@functools.lru_cache(maxsize=4)
def load_base(path: str) -> Base:
    """Open and identify a base checkpoint (file or diffusers folder) once per process."""
    from ..merge.base import open_base
    from ..merge.plan import base_variant, detect_base

    checkpoint = open_base(path)
    arch, layout, _ = detect_base(checkpoint)
    return Base(path, checkpoint, arch, layout, base_variant(checkpoint, arch))


def _check_one(path: Path, base: str | None, target: str | None, arch: str | None) -> FileReport:
    return check_file(path, base=load_base(base) if base else None, target=target, arch=arch)


def _warm() -> None:
    """Load every table (and the key parser's prefix lists) before the pool forks."""
    from ..dialects import _prefixes, _suffixes
    from ..keymap import architecture_names, load_architecture

    _suffixes()
    for name in architecture_names():
        load_architecture(name)
        _prefixes(name)


def check_paths(paths: list[str | os.PathLike], *, base: str | os.PathLike | None = None, target: str | None = None,
                arch: str | None = None, jobs: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> Iterator[FileReport]:
    """Check files and folders; yields one FileReport per file, in input order.

    Args:
        paths: files and folders (folders are scanned recursively for .safetensors and pickle files).
        base: a base checkpoint file or diffusers model folder to check the LoRAs against.
        target: regrade for `comfyui`, `diffusers`, `kohya`, `civitai` or `hf` (findings.FOR_TARGET).
        arch: force the architecture instead of detecting it.
        jobs: worker processes (default: one per CPU, one for a single file).
        progress: called as `progress(done, total)` after each file.
    Example:
        >>> reports = list(check_paths(["loras/"], jobs=2))
        >>> summarize(reports)["files"]
    """
    files = expand(paths)
    if not files:
        from ..errors import InputFileError

        raise InputFileError(f"{', '.join(map(str, paths))}: no .safetensors (or pickle) files to check.",
                             hint="Give LoRA files or folders that hold them.")
    base = str(base) if base is not None else None
    if base:
        load_base(base)  # an unusable base is an error of the whole run, raised here once
    _warm()
    jobs = jobs or min(os.cpu_count() or 1, len(files)) or 1
    done = 0
    if jobs == 1 or len(files) < 2:
        for f in files:
            yield _check_one(f, base, target, arch)
            done += 1
            if progress:
                progress(done, len(files))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    chunk = max(1, min(32, len(files) // (jobs * 8)))
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        n = len(files)
        for report in pool.map(_check_one, files, [base] * n, [target] * n, [arch] * n, chunksize=chunk):
            yield report
            done += 1
            if progress:
                progress(done, n)


def summarize(reports: list[FileReport], *, strict: bool = False) -> dict:
    """Counts per outcome and per (id, grade), and the exit code of the whole run (2 > 1 > 0)."""
    by_id: Counter = Counter()
    for r in reports:
        for f in r.findings:
            by_id[(f.id, f.grade)] += 1
    codes = [r.exit_code(strict) for r in reports]
    return {
        "summary": True,
        "files": len(reports),
        "ok": codes.count(0),
        "failed": codes.count(1),
        "unusable": codes.count(2),
        "grades": {g: sum(n for (_, grade), n in by_id.items() if grade == g) for g in GRADES},
        "findings": {f"{i} ({g})": n for (i, g), n in sorted(by_id.items(), key=lambda kv: (GRADES.index(kv[0][1]), kv[0][0]))},
        "exit_code": max(codes, default=0),
    }
