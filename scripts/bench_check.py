#!/usr/bin/env python
"""Time `lorabox check DIR --jobs N` on a folder of many small LoRAs.

    .venv/bin/python scripts/bench_check.py [--files 1000] [--jobs 2] [--dir DIR]

The folder cycles through the fixtures (diffusers/PEFT-written SD1.5, SDXL, FLUX.1 files) spelled by lorabox in
every dialect, a few of them broken (NaN, zero up, missing alpha), so every check runs. Prints files/s and the
wall time of the whole command (start-up, folder scan, workers, JSON Lines output), and the CPU seconds of all its
processes: on a shared machine the wall time depends on the load, the CPU time much less.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lorabox.conversion import convert, load_lora  # noqa: E402
from lorabox.io.safetensors import write_tensors  # noqa: E402
from lorabox.tensor import Tensor  # noqa: E402

SOURCES = ["sd15_peft", "sdxl_kohya_sgm", "flux1_kohya_bfl", "sd15_kohya_diffusers_names", "flux1_peft"]


def variants() -> list[tuple[dict, dict]]:
    out = []
    for name in SOURCES:
        lora = load_lora(REPO / "fixtures" / f"{name}.safetensors")
        for dialect in ("kohya", "comfyui", "diffusers"):
            res = convert(lora, dialect)
            out.append((dict(res.tensors), dict(res.metadata)))
    # a few broken ones
    sd, meta = out[0]
    up = next(k for k in sorted(sd) if k.endswith(".lora_up.weight"))
    bad = Tensor(np.array(sd[up].array, order="C"), sd[up].dtype)
    bad.array.reshape(-1)[0] = np.nan
    out.append(({**sd, up: bad}, meta))
    out.append(({k: t for k, t in sd.items() if not k.endswith(".alpha")}, meta))
    return out


def make_folder(folder: Path, n: int) -> int:
    pool = variants()
    total = 0
    for i in range(n):
        sd, meta = pool[i % len(pool)]
        path = folder / f"lora_{i:05d}.safetensors"
        write_tensors(path, sd, meta, durable=False)
        total += path.stat().st_size
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None, help="Folder to fill (default: a temporary one, removed after).")
    args = ap.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="bench_check_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        size = make_folder(folder, args.files)
        load = os.getloadavg()[0]
        cmd = [sys.executable, "-m", "lorabox", "check", str(folder), "--jobs", str(args.jobs), "--json"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        summary = json.loads(res.stdout.splitlines()[-1])
        print(f"lorabox check: {args.files} files ({size / 2**20:.0f} MiB) with --jobs {args.jobs}: {wall:.1f} s wall, "
              f"{args.files / wall:.0f} files/s, {cpu:.1f} s CPU in all processes (load average before: "
              f"{load:.1f}); exit {res.returncode}; {summary['ok']} ok, {summary['failed']} failed, "
              f"{summary['unusable']} unusable; {summary['grades']}")
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
