r"""What folding the multipliers into the product costs and gains (`NumpyCompute._lora_tile`, `fused`).

For 16-bit and fp8 outputs the CPU path's torch kernels widen W into a float64 tile and add ratio*scale * up@down
to it in one BLAS call (addmm), instead of the product, two multiplies and an add. This script times both on
FLUX.1-shaped weights (3072 x 12288, bf16 factors, ratio 0.8, alpha = rank / 2, the benchmark's LoRA), and counts
the elements whose rounded bytes differ from the definition's order (lorabox's numpy kernels): that happens only
on exact rounding ties, which bf16 factors and a ratio like 0.8 make far more common than random data would.

    .venv/bin/python scripts/bench_fused_ties.py                # rank 32 and 64, 4 weights each
    .venv/bin/python scripts/bench_fused_ties.py --weights 16 --rank 64
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


def weight(rng, rows: int, cols: int, rank: int, base: str):
    def bf16(a):
        return Tensor.from_values(a.astype(np.float32), "BF16")

    w = Tensor.from_values(rng.standard_normal((rows, cols)).astype(np.float32) * 0.02, base)
    a = Adapter("unet", "m", tensors={"up": bf16(rng.standard_normal((rows, rank)) * 0.01),
                                      "down": bf16(rng.standard_normal((rank, cols)) * 0.01)},
                alpha=Tensor.scalar(rank / 2))
    return w, [Patch(a, 0.8, None, 0)]


def timed(c, w, patches, dtype: str) -> tuple[np.ndarray, float]:
    info = SimpleNamespace(name="x.weight")
    t0 = time.process_time()
    out = c.process(info, w, patches, dtype).array
    dt = time.process_time() - t0
    return out.copy(), dt  # the next call may reuse the output buffer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, action="append", help="LoRA rank (repeatable; default 32 and 64)")
    ap.add_argument("--weights", type=int, default=4, help="weights per rank and dtype")
    ap.add_argument("--rows", type=int, default=3072)
    ap.add_argument("--cols", type=int, default=12288)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    fused = compute.NumpyCompute(1, kernels="torch")
    reference = compute.NumpyCompute(1, kernels="numpy")
    with fused.session(), reference.session():
        for rank in args.rank or [32, 64]:
            for dtype in ("BF16", "F16"):
                n = differ = 0
                t_fused = t_plain = 0.0
                for _ in range(args.weights):
                    w, patches = weight(rng, args.rows, args.cols, rank, dtype)
                    got, dt = timed(fused, w, patches, dtype)
                    t_fused += dt
                    compute.FUSED, saved = (), compute.FUSED  # the same torch kernels in the definition's order
                    try:
                        _, dt = timed(fused, w, patches, dtype)
                    finally:
                        compute.FUSED = saved
                    t_plain += dt
                    want, _ = timed(reference, w, patches, dtype)
                    n += got.size
                    differ += int(np.count_nonzero(got.view(np.uint16) != want.view(np.uint16)))
                print(f"rank {rank:3d} {dtype:4s}: fused {t_fused / n * 1e9:.2f} ns/el, definition's order "
                      f"{t_plain / n * 1e9:.2f} ns/el (CPU, one thread); {differ} of {n} elements differ from "
                      f"the numpy kernels ({differ / n:.1e})")


if __name__ == "__main__":
    main()
