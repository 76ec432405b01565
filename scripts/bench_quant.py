"""Benchmark lorabox's GGUF quantizers (`lorabox.quant.gguf_quants`) against gguf-py on one Flux-sized weight.

For each type: quantize and dequantize throughput in Mparam/s (best of --repeat), bytes per parameter and the
relative RMSE of the round trip, on a 3072x12288 float32 tensor ~ N(0, 0.02^2) (a Flux `img_mlp.0` weight).
The peer is `gguf.quants` itself: it encodes the legacy types (lorabox delegates to it, in threads) and decodes
every type; it cannot encode the K-quants.

    .venv/bin/python scripts/bench_quant.py [--shape 3072 12288] [--repeat 3] [--threads N] [--types Q4_K Q8_0]
"""
from __future__ import annotations

import argparse
from importlib import metadata
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gguf  # noqa: E402
from gguf import GGMLQuantizationType  # noqa: E402

from lorabox.quant.gguf_quants import LEGACY, QTYPES, dequantize, quantize, type_sizes  # noqa: E402


def best_of(repeat: int, fn):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def rel_rmse(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(y - x, dtype=np.float64)) / np.mean(np.square(x, dtype=np.float64))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=2, default=(3072, 12288))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="lorabox worker threads (default: all CPUs)")
    ap.add_argument("--types", nargs="+", default=list(QTYPES), choices=QTYPES)
    ap.add_argument("--no-peer", action="store_true", help="skip gguf-py (slow on the full tensor)")
    args = ap.parse_args()

    x = (np.random.default_rng(0).standard_normal(args.shape, dtype=np.float32) * 0.02).astype(np.float32)
    mp = x.size / 1e6
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{args.shape[0]}x{args.shape[1]} float32 ({mp:.1f} Mparam), {cpus} CPUs, threads={args.threads or cpus}, "
          f"numpy {np.__version__}, gguf {metadata.version('gguf')}, {platform.processor() or platform.machine()}")
    print()
    head = ("type", "B/param", "rel. RMSE", "quant Mp/s", "dequant Mp/s", "gguf quant Mp/s", "gguf dequant Mp/s", "bytes = gguf")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for qt in args.types:  # warm-up: a process's first chunk-sized temporaries are page-faulted in (malloc's mmap)
        dequantize(quantize(x[:256], qt, threads=args.threads), qt, x[:256].shape, threads=args.threads)
    for qt in args.types:
        bs, ts = type_sizes(qt)
        tq, data = best_of(args.repeat, lambda: quantize(x, qt, threads=args.threads))
        td, y = best_of(args.repeat, lambda: dequantize(data, qt, x.shape, threads=args.threads))
        err = rel_rmse(y, x)
        del y
        gq = gd = same = "-"
        if not args.no_peer:
            gtype = GGMLQuantizationType[qt]
            if qt in LEGACY:
                t, ref = best_of(1, lambda: gguf.quants.quantize(x, gtype))
                gq = f"{mp / t:.0f}"
                same = "yes" if np.array_equal(ref, data) else "NO"
                del ref
            t, ref = best_of(1, lambda: gguf.quants.dequantize(data, gtype))
            gd = f"{mp / t:.0f}"
            if qt not in LEGACY:
                same = "decodes equal" if np.array_equal(ref, dequantize(data, qt, x.shape)) else "DECODE DIFFERS"
            del ref
        print(f"| {qt} | {ts / bs:.4g} | {100 * err:.2f} % | {mp / tq:.0f} | {mp / td:.0f} | {gq} | {gd} | {same} |")


if __name__ == "__main__":
    main()
