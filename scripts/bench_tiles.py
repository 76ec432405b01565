r"""Tile shapes of the CPU path's torch kernels (`lorabox/merge/compute.py`: TILE_BYTES, TILE_COLS), on both cores.

Merges FLUX.1- or SDXL-shaped weights (one LoRA each, bf16 factors, ratio 0.8) through `NumpyCompute.process` with
each tile setting and each kind of tile in turn (`--kinds`: `certified`, float32 products with a proof per element,
where numba is installed; `bf16` and `fma`, the same in one compiled loop with bfloat16 pair products on AVX512_BF16
or FMAs, `lorabox/merge/_bf16_tiles.py`; `float64`, `LORABOX_CERTIFY=0`), repeated and interleaved, and
prints the best wall and CPU time per element of each:

    .venv/bin/python scripts/bench_tiles.py --model flux1 --rank 64
    .venv/bin/python scripts/bench_tiles.py --model sdxl --rank 32 --tiles 4096:2,4096:4,4096:8,2048:4
    .venv/bin/python scripts/bench_tiles.py --model flux1 --rank 64 --tiles 4096:4 --kinds certified,float64
    .venv/bin/python scripts/bench_tiles.py --model flux1 --rank 64 --tiles 4096:4,4096:8 --kinds certified,bf16,fma
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorabox.lora import Adapter  # noqa: E402
from lorabox.merge import compute  # noqa: E402
from lorabox.merge.plan import Patch  # noqa: E402
from lorabox.tensor import Tensor  # noqa: E402

SHAPES = {"flux1": ("BF16", [(3072, 12288), (12288, 3072), (3072, 3072)]),
          "sdxl": ("F16", [(1280, 10240), (5120, 1280), (1280, 1280), (640, 640), (640, 5760), (1280, 11520)])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="flux1")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--tiles", default="4096:2,4096:4,4096:8,1024:4,512:4",
                    help="COLS:MB settings, comma-separated (at most COLS wide, about MB of float64 each)")
    ap.add_argument("--kinds", default="certified", help="certified, bf16, fma, float64, comma-separated")
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="compute threads (default: the CPUs)")
    args = ap.parse_args()
    dtype, shapes = SHAPES[args.model]
    rng = np.random.default_rng(0)
    cases = []
    for rows, cols in shapes:
        w = Tensor.from_values(rng.standard_normal((rows, cols)).astype(np.float32), dtype)
        factors = {"up": rng.standard_normal((rows, args.rank)) * 0.01,
                   "down": rng.standard_normal((args.rank, cols)) * 0.01}
        a = Adapter("unet", "m", alpha=Tensor.scalar(args.rank / 2),
                    tensors={k: Tensor.from_values(v.astype(np.float32), "BF16") for k, v in factors.items()})
        cases.append((w, [Patch(a, 0.8, None, 0)]))
    n = sum(w.array.size for w, _ in cases)
    settings = [tuple(int(x) for x in s.split(":")) for s in args.tiles.split(",")]
    c = compute.NumpyCompute(args.threads)
    info = SimpleNamespace(name="x.weight")
    kinds = args.kinds.split(",")
    best: dict[tuple[str, int, int], tuple[float, float]] = {}
    saved = compute.TILE_COLS, compute.TILE_BYTES
    try:
        with c.session():
            for _ in range(args.repeat):
                for kind, (cols, mb) in ((k, s) for k in kinds for s in settings):
                    compute.TILE_COLS, compute.TILE_BYTES = cols, mb << 20
                    c.certify = kind != "float64"
                    c.bf16_dot = kind if kind in ("bf16", "fma") else None
                    for w, patches in cases:  # warm: buffers of this size
                        c.process(info, w, patches, dtype)
                    t, cpu = time.perf_counter(), time.process_time()
                    for w, patches in cases:
                        c.process(info, w, patches, dtype)
                    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
                    old = best.get((kind, cols, mb), (float("inf"), float("inf")))
                    best[(kind, cols, mb)] = (min(old[0], wall), min(old[1], cpu))
    finally:
        compute.TILE_COLS, compute.TILE_BYTES = saved
    print(f"{args.model} rank {args.rank} {dtype}, {n / 1e6:.0f} M elements, {c.threads} threads, "
          f"best of {args.repeat}:")
    for (kind, cols, mb), (wall, cpu) in best.items():
        print(f"  {kind} tiles {cols:5d} wide, {mb:2d} MB: {wall / n * 1e9:.2f} ns/el wall, "
              f"{cpu / n * 1e9:.2f} ns/el CPU")


if __name__ == "__main__":
    main()
