"""The numba half of `certified`: imported only when numba is installed. The 16-bit conversions are LLVM's own
(`fpext`/`fptrunc` for float16: F16C on x86, IEEE round-to-nearest-even) or 32-bit integer steps for bfloat16
(torch's rounding), written as intrinsics so that numba's integer widening does not keep the loop from running
8 floats at a time."""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_I32, _I16 = ir.IntType(32), ir.IntType(16)
_F32, _HALF = ir.FloatType(), ir.HalfType()
E = np.float32(2.0 ** -21)  # the bound's |v| term: v's own rounding, the bound's and lo/hi's (8 units of 2^-24)
CHUNK = 128  # elements whose flags are gathered before the (rare) repairs


def _const(v: int):
    return ir.Constant(_I32, v)


def _to_float32(builder, x, half: bool):
    x16 = builder.trunc(x, _I16) if x.type.width > 16 else x
    if half:
        return builder.fpext(builder.bitcast(x16, _HALF), _F32)
    return builder.bitcast(builder.shl(builder.zext(x16, _I32), _const(16)), _F32)


def _to_bits(builder, f, half: bool):
    """float32 -> 16-bit bits (int32), round to nearest even; NaN payloads are the caller's business."""
    if half:
        return builder.zext(builder.bitcast(builder.fptrunc(f, _HALF), _I16), _I32)
    x = builder.bitcast(f, _I32)
    odd = builder.and_(builder.lshr(x, _const(16)), _const(1))
    return builder.lshr(builder.add(builder.add(x, _const(0x7FFF)), odd), _const(16))


@intrinsic
def widen(typingctx, h, half):
    """16-bit float bits -> float32 (exact)."""
    if not isinstance(h, types.Integer) or not isinstance(half, types.IntegerLiteral):
        return None
    is_half = bool(half.literal_value)
    return types.float32(h, half), lambda context, builder, sig, args: _to_float32(builder, args[0], is_half)


@intrinsic
def narrow(typingctx, f, half):
    if f != types.float32 or not isinstance(half, types.IntegerLiteral):
        return None
    is_half = bool(half.literal_value)
    return types.int32(f, half), lambda context, builder, sig, args: _to_bits(builder, args[0], is_half)


@intrinsic
def flag(typingctx, lo, hi, half):
    """Nonzero (int32) when lo and hi round to different 16-bit values, or either is inf or NaN (then so may be v,
    or the bound: the element is recomputed)."""
    if not isinstance(half, types.IntegerLiteral):
        return None
    is_half = bool(half.literal_value)

    def codegen(context, builder, sig, args):
        apart = builder.xor(_to_bits(builder, args[0], is_half), _to_bits(builder, args[1], is_half))
        for f in args[:2]:
            magnitude = builder.and_(builder.bitcast(f, _I32), _const(0x7FFFFFFF))
            special = builder.icmp_unsigned(">=", magnitude, _const(0x7F800000))
            apart = builder.or_(apart, builder.zext(special, _I32))
        return apart

    return types.int32(lo, hi, half), codegen


@intrinsic
def or32(typingctx, a, b):
    return types.int32(types.int32, types.int32), lambda context, builder, sig, args: builder.or_(args[0], args[1])


@intrinsic
def bits(typingctx, f):
    return types.int32(types.float32), lambda context, builder, sig, args: builder.bitcast(args[0], _I32)


@njit(nogil=True, error_model="numpy", boundscheck=False, cache=True)
def _finish(p, w_all, out_all, r0, c0, rows, cols, up, down_t, factors, half):
    """One tile: p (float32 products, tile-shaped) -> out_all[r0:, c0:] (16-bit bits), certified or repaired.
    Returns how many elements were repaired."""
    nr, nc = p.shape
    k = up.shape[1]
    flags = np.empty(CHUNK, np.int32)
    tiny = np.float32(2.0 ** -120)
    repaired = 0
    for i in range(nr):
        a = rows[i]
        w = w_all[r0 + i, c0:c0 + nc]
        out = out_all[r0 + i, c0:c0 + nc]
        pr = p[i]
        for j0 in range(0, nc, CHUNK):
            n = min(CHUNK, nc - j0)
            any_flag = np.int32(0)
            # the vectorised pass; unsigned indices spare it numba's negative-index wraparound, four instructions per
            # array read (one SDXL weight, fp16, one thread: 2.5 -> 1.9 ns per element)
            for m in range(np.uint64(n)):
                j = np.uint64(j0) + m
                v = widen(w[j], half) + pr[j]
                b = a * cols[j] + abs(v) * E + tiny
                lo = v - b
                hi = v + b
                out[j] = np.uint16(narrow(hi, half))
                f = flag(lo, hi, half)
                flags[m] = f
                any_flag = or32(any_flag, f)
            if any_flag:
                for m in range(n):
                    if flags[m]:
                        out[j0 + m] = _exact(w[j0 + m], up[i], down_t[c0 + j0 + m], factors, k, half)
                        repaired += 1
    return repaired


@njit(inline="always")
def _exact(wbits, u, d, factors, k, half):
    """The definition for one element: up@down in float64, times each multiplier, plus W, to float32, to 16 bits
    with torch's scalar NaN (0x7FC0 for bfloat16, sign | 0x7E00 for float16; torch's vectorised bfloat16 cast
    writes 0xFFFF instead)."""
    # products of 16-bit or float32 factors are exact in float64, and so are the sums of 16-bit ones unless they
    # span more than about 2^30: the order (four partial sums here, the BLAS's in the definition) rarely shows
    s0 = s1 = s2 = s3 = 0.0
    q = 0
    while q + 4 <= k:
        s0 += u[q] * d[q]
        s1 += u[q + 1] * d[q + 1]
        s2 += u[q + 2] * d[q + 2]
        s3 += u[q + 3] * d[q + 3]
        q += 4
    while q < k:
        s0 += u[q] * d[q]
        q += 1
    s = (s0 + s1) + (s2 + s3)
    for f in factors:
        s *= f
    x = np.float32(np.float64(widen(wbits, half)) + s)
    xb = bits(x)
    if (xb & 0x7FFFFFFF) > 0x7F800000:
        return np.uint16(0x7E00 | ((xb >> 16) & 0x8000)) if half else np.uint16(0x7FC0)
    return np.uint16(narrow(x, half))


@njit(nogil=True, error_model="numpy", boundscheck=False, cache=True)
def finish_bf16(p, w_all, out_all, r0, c0, rows, cols, up, down_t, factors):
    return _finish(p, w_all, out_all, r0, c0, rows, cols, up, down_t, factors, 0)


@njit(nogil=True, error_model="numpy", boundscheck=False, cache=True)
def finish_f16(p, w_all, out_all, r0, c0, rows, cols, up, down_t, factors):
    return _finish(p, w_all, out_all, r0, c0, rows, cols, up, down_t, factors, 1)


@njit(nogil=True, error_model="numpy", boundscheck=False, cache=True, inline="always")
def _repair(masks, w_all, out_all, r0, c0, up, down_t, factors, half):
    """The flagged elements of one tile of `_bf16_tiles` (bit b of masks[i, q]: row r0+i, column c0+16q+b), computed
    again by the definition. Returns how many."""
    k = up.shape[1]
    repaired = 0
    for i in range(masks.shape[0]):
        for q in range(masks.shape[1]):
            m = masks[i, q]
            if m:
                for b in range(16):
                    if (m >> b) & 1:
                        j = c0 + 16 * q + b
                        out_all[r0 + i, j] = _exact(w_all[r0 + i, j], up[i], down_t[j], factors, k, half)
                        repaired += 1
    return repaired


@njit(nogil=True, error_model="numpy", boundscheck=False, cache=True)
def repair_bf16(masks, w_all, out_all, r0, c0, up, down_t, factors):
    return _repair(masks, w_all, out_all, r0, c0, up, down_t, factors, 0)


@njit(nogil=True, error_model="numpy", boundscheck=False, cache=True)
def repair_f16(masks, w_all, out_all, r0, c0, up, down_t, factors):
    return _repair(masks, w_all, out_all, r0, c0, up, down_t, factors, 1)
