"""Float32 products with a certificate: the CPU path's fast way to the float64 definition's bytes for 16-bit outputs.

A bfloat16 or float16 output keeps 8 or 11 bits of W + ratio*scale*(up@down). Computing that sum in float32 is
twice as fast as in float64 on the BLAS, and it almost always rounds to the same 16-bit value; "almost" is not
exact, so every element carries a proof. For element (i, j) the float32 product P differs from the float64 product
by at most

    B = gamma(K + 4) * |u_i| * |d_j|       (gamma(n) = n * 2^-24: any summation order; Cauchy-Schwarz for the sum)

where u_i is row i of ratio*scale*up and d_j column j of down. With v = W + P (float32) the definition's float64
value lies in [v - b, v + b], b = B + 2^-21 |v| + 2^-120 (the rounding of v, of the bound itself, and float32's
subnormals). Torch rounds float64 through float32 to the output, and both roundings are monotone: if v - b and
v + b round to the same 16-bit value, so does the definition's value, ties and all. The elements where they do
not (0.01-0.5 % of them, more the larger the delta is against W) are computed again in float64 in the definition's
order: up@down, times each multiplier, plus W, then rounded as torch does. So the output is the definition's,
byte for byte, with no tie exceptions (tests/test_merge_certified.py).

The elementwise half (W + P, the two roundings, the flags and the float64 repair) is one pass compiled by numba:
one read of P and W and one write of the output, vectorised 8 wide. numba is optional (`lorabox[torch]` brings
it); without it the CPU path computes every tile in float64. `kernel(dtype)` compiles on first use (3-4 s
once; numba caches it on disk after that).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import threading

import numpy as np

HALF = {"BF16": 0, "F16": 1}
SLACK = 1 + 2.0 ** -18  # covers the float32 rounding of the bound's own factors and the float64 definition's error
_lock = threading.Lock()
_kernels: dict = {}
_building: dict = {}  # key -> the lock its build runs under


def bounds(up_scaled: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row and per-column factors of B (float32, rounded up by SLACK): gamma(K + 4) * |u_i| and |d_j|."""
    k = up_scaled.shape[1]
    gamma = (k + 4) * 2.0 ** -24
    rows = np.sqrt(np.einsum("ik,ik->i", up_scaled, up_scaled)) * (gamma * SLACK * SLACK)
    cols = np.sqrt(np.einsum("kj,kj->j", down, down)) * SLACK
    return rows.astype(np.float32), cols.astype(np.float32)


def kernel(dtype: str):
    """The compiled tile function for a BF16 or F16 weight written as the same type, or None when numba is not
    installed or cannot compile it here (the caller then computes in float64)."""
    half = HALF.get(dtype)
    return None if half is None else _once(half, _compile, half)


@functools.cache
def installed() -> bool:
    """Whether numba is installed (asked without importing it: 0.2 s)."""
    return importlib.util.find_spec("numba") is not None


def _once(key, build, *args):
    """`build(*args)`, made once per process. Each key has its own lock: compute threads may ask together, and one
    build (the LLVM loop, on the compile thread) does not hold up another (the numba pass, from the disk cache)."""
    with _lock:
        if key in _kernels:
            return _kernels[key]
        lock = _building.setdefault(key, threading.Lock())
    with lock:
        if key not in _kernels:
            _kernels[key] = build(*args)
    return _kernels[key]


def _compile(half: int):
    try:
        from . import _certified_numba as impl
    except ImportError:
        return None
    fn = impl.finish_f16 if half else impl.finish_bf16
    try:  # compile now, on a tiny tile: a platform numba cannot target shows here, not in the middle of a merge
        p = np.zeros((1, 1), np.float32)
        w = np.zeros((1, 1), np.uint16)
        w.flags.writeable = False  # as base weights are
        fn(p, w, np.zeros((1, 1), np.uint16), 0, 0, np.zeros(1, np.float32), np.zeros(1, np.float32),
           np.zeros((1, 1)), np.zeros((1, 1)), np.ones(1))
    except Exception:  # noqa: BLE001 -- any failure means: use the float64 path
        return None
    return fn


def bf16_dot() -> str | None:
    """How `_bf16_tiles` forms its products here: "bf16" (AVX512_BF16) where the CPU has it, else None (the float32
    GEMM). LORABOX_BF16_TILES=0 turns the fused tiles off, =fma forces the FMA twin (the benchmarks' A/B)."""
    setting = os.environ.get("LORABOX_BF16_TILES", "auto")
    if setting == "0":
        return None
    if setting in ("bf16", "fma"):
        return setting
    from . import _bf16_tiles

    return "bf16" if _bf16_tiles.has_avx512_bf16() else None


def bf16_tiles(dot: str, dtype: str = "BF16"):
    """(tile kernel, repair pass) of `_bf16_tiles` for a `dtype` weight (BF16 or F16) with products formed by `dot`,
    or None where numba or llvmlite cannot compile them here."""
    return _once(("bf16_tiles", dot, dtype), _compile_bf16_tiles, dot, dtype)


def _compile_bf16_tiles(dot: str, dtype: str):
    if dtype not in HALF:
        return None
    try:
        from . import _bf16_tiles
        from . import _certified_numba as impl
    except ImportError:
        return None
    fn = _bf16_tiles.kernel(dot, dtype)
    if fn is None:
        return None
    repair = impl.repair_f16 if HALF[dtype] else impl.repair_bf16
    try:  # compile the repair pass now, on a tiny tile
        w = np.zeros((1, 16), np.uint16)
        w.flags.writeable = False
        repair(np.ones((1, 1), np.uint16), w, np.zeros((1, 16), np.uint16), 0, 0, np.zeros((1, 1)),
               np.zeros((16, 1)), np.ones(1))
    except Exception:  # noqa: BLE001 -- any failure means: use the float32 GEMM
        return None
    return fn, repair
