r"""The I/O ceiling of a merge: copy a file with lorabox's O_DIRECT reader and writer (no compute), against `cp` +
`sync` of the same file in the same run.

A merge reads its base and writes its output on the same disk; this copy does only that, with the merge's read
runs and depths (`lorabox/io/direct.py`, `lorabox/merge/engine.py`), so the gap between it and a merge is the
compute's. Give a large file (a base written by scripts/bench_merge.py --keep):

    .venv/bin/python scripts/bench_direct_copy.py /work/bench/flux1.safetensors
    .venv/bin/python scripts/bench_direct_copy.py BIG.safetensors --run-mb 64 --read-depth 4 --ahead-mb 256 --write-depth 8
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorabox.io import direct  # noqa: E402
from lorabox.parallel import BufferPool  # noqa: E402


def direct_copy(src: Path, dst: Path, run: int, read_depth: int, ahead: int, write_depth: int, stage: int) -> None:
    size = src.stat().st_size
    fd = direct.open_read(src)
    if fd is None:
        raise SystemExit(f"{src}: this filesystem refuses O_DIRECT reads")
    reader = direct.DirectReader(fd, BufferPool(keep=direct.READ_KEEP), depth=read_depth)
    dst.touch()
    out = direct.DirectFile(os.open(dst, os.O_WRONLY | os.O_DIRECT), stage, write_depth)
    try:
        for buf in reader.read_in_order([(s, min(size, s + run)) for s in range(0, size, run)], ahead):
            out.write(buf)
        out.finish()
    finally:
        out.close()
        reader.close()
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", type=Path)
    ap.add_argument("--run-mb", type=int, default=direct.RUN >> 20, help="bytes per read (the merge: 16 MB or more)")
    ap.add_argument("--read-depth", type=int, default=direct.READ_DEPTH)
    ap.add_argument("--ahead-mb", type=int, default=direct.AHEAD >> 20)
    ap.add_argument("--write-depth", type=int, default=direct.DEPTH)
    ap.add_argument("--stage-mb", type=int, default=direct.STAGE >> 20)
    args = ap.parse_args()
    if not args.file.is_file():
        raise SystemExit(f"{args.file}: no such file. Give a large file, e.g. a base written by bench_merge.py --keep.")
    dst = args.file.with_name(args.file.name + ".copy")
    t = time.perf_counter()
    subprocess.run(["sh", "-c", f"cp '{args.file}' '{dst}' && sync '{dst}'"], check=True)
    t_cp = time.perf_counter() - t
    dst.unlink()
    before = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    try:
        direct_copy(args.file, dst, args.run_mb << 20, args.read_depth, args.ahead_mb << 20, args.write_depth,
                    args.stage_mb << 20)
    finally:
        dst.unlink(missing_ok=True)
    t_direct = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{args.file.stat().st_size / 1e9:.1f} GB: cp + sync {t_cp:.1f} s; O_DIRECT copy (reads of {args.run_mb} MB, "
          f"{args.read_depth} at once, {args.ahead_mb} MB ahead; {args.write_depth} writes of {args.stage_mb} MB) "
          f"{t_direct:.1f} s ({after.ru_utime - before.ru_utime:.1f} user + {after.ru_stime - before.ru_stime:.1f} "
          f"system CPU-s): ratio {t_direct / t_cp:.2f}")


if __name__ == "__main__":
    main()
