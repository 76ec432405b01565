"""GGUF block quantization on the CPU, numpy only.

Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 are gguf-py's arithmetic (ggml's reference) done here in fewer, cheaper passes
over the data, both ways (`_encode_legacy`, `_decode_legacy`: 1.3-2.5x faster, the same bytes and floats: tests hold
them to `gguf.quants.quantize` and `gguf.quants.dequantize`). gguf-py cannot
encode the K-quants, so Q4_K, Q5_K and Q6_K are encoded here with the idea of ggml's reference quantizers
(`quantize_row_q{4,5,6}_K_ref`): per sub-block, try a few scale candidates and keep the least (weighted) squared
error, then quantize the sub-block scales to 6 or 8 bits against one fp16 scale per 256-value super-block.
The search runs on all sub-blocks at once; the result is not bit-identical with ggml, but decodes with any GGUF
reader (`gguf.quants.dequantize` is the oracle in the tests). Unlike ggml's reference: fewer candidates
(`_STEPS`), the candidates' rounding keeps the sub-block's own minimum, the 6/8-bit sub-block scales are
rounded against the fp16 scale actually stored, and Q6_K's fp16 scale rounds away from zero (see `_to_f16`).

    data = quantize(weight, "Q4_K")                    # uint8 [..., row_bytes]
    back = dequantize(data, "Q4_K", weight.shape)      # float32

Byte layouts (super-block of QK_K = 256 values; the decoders in gguf-py's `quants.py` define them):
    Q4_K  d f16 | dmin f16 | 12 bytes: eight 6-bit scales and mins | 128 bytes: 4-bit quants
    Q5_K  as Q4_K, with 32 bytes of fifth bits (bit j of byte l: value l of sub-block j) before the quants
    Q6_K  128 bytes low nibbles | 64 bytes high 2-bit pairs | 16 int8 scales | d f16
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType
from gguf import quants as _gq

from ..errors import LoraboxError
from ..parallel import run_chunks

LEGACY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")   # gguf-py's arithmetic (`_encode_legacy`)
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")                  # encoded here
QTYPES = LEGACY + K_QUANTS

_F16, _F32, _F64, _U8 = np.float16, np.float32, np.float64, np.uint8
_K_SCALE_SIZE = _gq.Q4_K.K_SCALE_SIZE  # packed 6-bit scales and mins of Q4_K/Q5_K
_SUB45, _SUB6 = 32, 16                  # sub-block sizes of Q4_K/Q5_K and of Q6_K
_EPS = 1e-15                            # ggml's GROUP_MAX_EPS: a sub-block this small is all zero

# Scale candidates tried per sub-block, as offsets r of the quantization range: the step is range/(nmax + r).
# ggml tries r = -1.0..1.0 by 0.1 (Q4_K), -0.5..1.0 (Q5_K) and 0, ±0.1..±0.9 (Q6_K); fewer cost little error.
_STEPS = {
    "Q4_K": (-1.0, -0.6, -0.3, 0.0, 0.3, 0.6, 1.0),
    "Q5_K": (-0.5, -0.2, 0.0, 0.3, 0.6, 1.0),
    "Q6_K": (-0.6, -0.3, 0.0, 0.3, 0.6),
}
_CHUNK_SUPER = 1024     # super-blocks per work item (256 Ki values: fewer numpy calls, still cache-sized)
_CHUNK_LEGACY = 8192    # legacy blocks per work item
_LANES, _WORDS, _U64 = np.dtype("<u8"), np.dtype("<u2"), np.uint64  # codes 8 to a lane, to pair and split nibbles
_NIBBLES, _SIGN = np.uint64(0x0F0F0F0F0F0F0F0F), np.uint32(0x80000000)


class QuantError(LoraboxError, ValueError):
    """A tensor that cannot be quantized, or bytes that do not fit the type and shape asked for."""


def type_sizes(qtype: str) -> tuple[int, int]:
    """(values per block, bytes per block) of `qtype`, from `gguf.GGML_QUANT_SIZES`."""
    return GGML_QUANT_SIZES[_qtype(qtype)]


def _qtype(qtype) -> GGMLQuantizationType:
    name = getattr(qtype, "name", qtype)
    if not isinstance(name, str) or name.upper() not in QTYPES:
        raise QuantError(f"Unknown GGUF quant type {qtype!r}.", hint=f"lorabox quantizes to {', '.join(QTYPES)}.")
    return GGMLQuantizationType[name.upper()]


def _check_layouts() -> None:
    """Our byte layouts add up to gguf's type sizes (fails at import if a gguf release changes them)."""
    parts = {
        "Q4_K": 2 + 2 + _K_SCALE_SIZE + QK_K // 2,
        "Q5_K": 2 + 2 + _K_SCALE_SIZE + QK_K // 8 + QK_K // 2,
        "Q6_K": QK_K // 2 + QK_K // 4 + QK_K // _SUB6 + 2,
    }
    for name, size in parts.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]] == (QK_K, size), name


_check_layouts()


# ---------------------------------------------------------------------------------------------------- public API

def quantize(array: np.ndarray, qtype: str, *, threads: int | None = None, pool=None) -> np.ndarray:
    """Quantize a float tensor to a GGUF block type.

    Args:
        array: values, cast to float32; the last dimension must be a multiple of the type's block size
            (32, or 256 for the K-quants).
        qtype: one of `QTYPES` ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K").
        threads: worker threads (default: the CPUs this process may use); the bytes do not depend on it.
        pool: an executor whose threads run the chunks (the merge's workers) rather than threads made per call.

    Returns:
        uint8 array of shape `[*array.shape[:-1], row_bytes]`, the tensor data of a GGUF file.

    Example:
        >>> w = np.random.default_rng(0).standard_normal((4, 256), dtype=np.float32)
        >>> data = quantize(w, "Q4_K")
        >>> data.shape, data.dtype
        ((4, 144), dtype('uint8'))
    """
    qt = _qtype(qtype)
    bs, ts = GGML_QUANT_SIZES[qt]
    x = np.asarray(array)  # cast to float32 chunk by chunk: no full-size copy of a bf16/f16 tensor
    _check_shape(x.shape, qt)
    out = np.empty((x.size // bs, ts), _U8)
    if qt.name in LEGACY:
        _map_blocks(lambda chunk: _encode_legacy(np.ascontiguousarray(chunk, dtype=_F32), qt.name),
                    x.reshape(-1, bs), out, _CHUNK_LEGACY, threads, pool)
    else:
        encode_k = _ENCODERS[qt.name]
        _map_blocks(lambda chunk: encode_k(np.ascontiguousarray(chunk, dtype=_F32)), x.reshape(-1, bs), out,
                    _CHUNK_SUPER, threads, pool)
    return out.reshape(*x.shape[:-1], x.shape[-1] // bs * ts)


def dequantize(data: np.ndarray, qtype: str, shape, *, threads: int | None = None, pool=None) -> np.ndarray:
    """Decode GGUF block data back to float32.

    Args:
        data: the quantized bytes (any uint8 array or buffer holding exactly the tensor's blocks).
        qtype: one of `QTYPES`.
        shape: the float tensor's shape (the last dimension a multiple of the block size).
        threads: worker threads (default: the CPUs this process may use).
        pool: as for `quantize`.

    Returns:
        float32 array of `shape`.

    Example:
        >>> x = np.linspace(-1, 1, 64, dtype=np.float32)
        >>> y = dequantize(quantize(x, "Q8_0"), "Q8_0", x.shape)
        >>> y.shape, bool(np.abs(y - x).max() < 0.01)
        ((64,), True)
    """
    qt = _qtype(qtype)
    bs, ts = GGML_QUANT_SIZES[qt]
    shape = tuple(int(n) for n in shape)
    raw = np.frombuffer(data, _U8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(_U8)
    n_blocks = _check_blocks(raw.size, shape, qt)
    out = np.empty((n_blocks, bs), _F32)
    if qt.name in LEGACY:
        _map_blocks(lambda chunk: _decode_legacy(chunk, qt.name), raw.reshape(n_blocks, ts), out, _CHUNK_LEGACY,
                    threads, pool)
    else:
        _map_blocks(_DECODERS[qt.name], raw.reshape(n_blocks, ts), out, _CHUNK_SUPER, threads, pool)
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------------- plumbing

def _map_blocks(fn: Callable[[np.ndarray], np.ndarray], src: np.ndarray, out: np.ndarray, chunk: int,
                threads: int | None, pool=None) -> None:
    """out[a:b] = fn(src[a:b]) over chunks of `chunk` blocks, in parallel (see lorabox.parallel)."""
    def work(a: int) -> None:
        out[a:a + chunk] = fn(src[a:a + chunk])

    run_chunks(work, range(0, src.shape[0], chunk), threads, pool)


def _check_shape(shape, qt) -> None:
    """The last dimension holds whole blocks (also `gguf_torch.quantize`'s check)."""
    bs = GGML_QUANT_SIZES[qt][0]
    if len(shape) == 0 or shape[-1] % bs:
        raise QuantError(
            f"Can't quantize a tensor of shape {tuple(shape)} to {qt.name}: its last dimension is not a "
            f"multiple of the block size {bs}.",
            hint="Keep such tensors in F16/F32 (as llama-quantize and ComfyUI-GGUF do).")


def _check_blocks(nbytes: int, shape: tuple, qt) -> int:
    """The number of blocks of a `shape` tensor, which `nbytes` bytes must hold exactly (also `gguf_torch`'s)."""
    bs, ts = GGML_QUANT_SIZES[qt]
    if not shape or shape[-1] % bs:
        raise QuantError(f"Shape {shape} does not fit {qt.name}: the last dimension must be a multiple of {bs}.")
    n_blocks = int(np.prod(shape)) // bs
    if nbytes != n_blocks * ts:
        raise QuantError(f"{nbytes} bytes do not hold a {qt.name} tensor of shape {shape} "
                         f"({n_blocks * ts} bytes).", hint="Check the tensor's type and shape in the file header.")
    return n_blocks


def _check_finite(lo, hi, qt) -> None:
    """`lo` and `hi` (a tensor's extremes, or anything a NaN or Inf reaches) are finite; numpy or torch."""
    if not (bool(_isfinite(lo)) and bool(_isfinite(hi))):
        raise QuantError(f"Can't quantize to {getattr(qt, 'name', qt)}: the tensor holds NaN or Inf.",
                         hint="Check the merge inputs; a non-finite weight would decode as garbage.")


def _check_scales(h, v, qt: str) -> None:
    """The fp16 super-block scales `h` (rounded from `v`) are finite; numpy or torch."""
    if not bool(_isfinite(h)):
        raise QuantError(f"Can't quantize to {qt}: values too large for its fp16 block scales "
                         f"(a scale of {float(abs(v).max()):.3g}; fp16 ends at 65504).",
                         hint="Keep this tensor in F32 or F16.")


def _isfinite(a) -> bool:
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return np.isfinite(a).all()
    import torch

    return torch.isfinite(a).all()


def _to_f16(v: np.ndarray, qt: str, away: bool = False) -> np.ndarray:
    """fp16 super-block scale. away=True rounds away from zero, so that the peak sub-block scale (v / d) does not
    clip; that matters for Q6_K, whose d = max|x|/4096 is an fp16 subnormal (coarse) for weights below ~0.25."""
    with np.errstate(over="ignore"):
        h = v.astype(_F32).astype(_F16)  # through float32, as torch rounds float64 to float16 (gguf_torch)
        if away:
            short = np.abs(h.astype(_F32)) < np.abs(v)
            h[short] = np.nextafter(h[short], np.copysign(_F16(np.inf), v[short]).astype(_F16))
    _check_scales(h, v, qt)
    return h


def _f16_bytes(h: np.ndarray) -> np.ndarray:
    return h.reshape(-1, 1).view(_U8)


def _read_f16(col: np.ndarray) -> np.ndarray:
    """Two byte columns -> float32 column [n, 1]."""
    return np.ascontiguousarray(col).view(_F16).astype(_F32)


# ---------------------------------------------------------------------------------------------------- searches

def _colsum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 of a [2^k, S] float32 array by halving (element i + element i + 2^(k-1), and so on), in
    place: `a` is scratch. A fixed order, so the same bits on every device (`gguf_torch` sums the same way; numpy's
    and torch's own reductions each pick their order); on the transposed layout each step adds contiguous slabs."""
    n = a.shape[0]
    while n > 1:
        n //= 2
        np.add(a[:n], a[n:2 * n], out=a[:n])
    return a[0]


def _fit_scale_min(x: np.ndarray, nmax: int, steps, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x [S, n]: (scale >= 0, offset <= 0) with x ~ scale*l + offset, l in 0..nmax.

    Weighted least squares (weights |x| + rms(row), as ggml's make_qkx2_quants) over the rounding given by each
    candidate step range/(nmax + r); the offset is kept <= 0 so that it encodes as a 6-bit positive "min".
    Works on x.T ([n, S]): numpy reduces and broadcasts along a long axis 0 many times faster than a short axis 1."""
    x = np.ascontiguousarray(x.T)
    lo, hi = x.min(axis=0), x.max(axis=0)
    _check_finite(lo, hi, name)
    np.minimum(lo, 0, out=lo)
    rng = hi - lo
    ok = rng > 1e-30  # also keeps 1/rng finite in float32
    inv_rng = np.divide(1, rng, out=np.zeros_like(rng), where=ok)
    xs = x - lo
    w = np.abs(x)
    w += np.sqrt(_colsum(x * x) / _F32(x.shape[0]))
    swx = _colsum(w * x).astype(_F64)
    sw = _colsum(w.copy()).astype(_F64)

    best_e = np.full(x.shape[1], np.inf)
    best_s = (rng / _F32(nmax)).astype(_F64)  # kept where no candidate fits (rng == 0: a constant row)
    best_m = lo.astype(_F64)
    t, wl, tmp = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        for r in steps:
            np.multiply(xs, inv_rng * _F32(nmax + r), out=t)
            np.rint(t, out=t)
            if r > 0.4:
                np.clip(t, 0, nmax, out=t)  # t >= 0 already; clip is 4x faster than minimum here
            np.multiply(w, t, out=wl)
            sl2 = _colsum(np.multiply(wl, t, out=tmp)).astype(_F64)
            slx = _colsum(np.multiply(wl, x, out=tmp)).astype(_F64)
            sl = _colsum(wl).astype(_F64)
            det = sw * sl2 - sl * sl
            s = (sw * slx - swx * sl) / det
            m = (sl2 * swx - sl * slx) / det
            clamp = m > 0
            s = np.where(clamp, slx / sl2, s)
            m = np.minimum(m, 0)
            # weighted squared error less the constant sum(w*x*x); at a least-squares optimum (with or without
            # the offset pinned to 0) it is -(s*sum(w*l*x) + m*sum(w*x))
            e = -(s * slx + m * swx)
            # det ~ weighted variance of l: float noise, not a fit, when every l is equal (a constant row)
            better = (det > 1e-6 * sw * sl2) & (e < best_e)
            best_e = np.where(better, e, best_e)
            best_s = np.where(better, s, best_s)
            best_m = np.where(better, m, best_m)
    return np.maximum(best_s, 0), best_m


def _fit_signed_scale(x: np.ndarray, nmax: int, steps, name: str) -> np.ndarray:
    """Per row of x [S, n]: scale with x ~ scale*l, l in -nmax..nmax-1 (ggml's make_qx_quants, weights x*x).

    The value of largest magnitude maps to -nmax (the longer side of the range); each candidate step is
    |max|/(nmax + r), and the least-squares scale of the best rounding wins. Works on x.T, as `_fit_scale_min`."""
    x = np.ascontiguousarray(x.T)
    lo, hi = x.min(axis=0), x.max(axis=0)
    _check_finite(lo, hi, name)
    vmax = np.where(hi >= -lo, hi, lo)
    ok = np.abs(vmax) >= _EPS
    neg_inv = np.divide(-1, vmax, out=np.zeros_like(vmax), where=ok)
    w = x * x
    best = np.zeros(x.shape[1])
    best_s = np.zeros(x.shape[1])
    t, wl, tmp = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        for r in steps:
            np.multiply(x, neg_inv * _F32(nmax + r), out=t)
            np.rint(t, out=t)
            np.clip(t, -nmax, nmax - 1, out=t)
            np.multiply(w, t, out=wl)
            slx = _colsum(np.multiply(wl, x, out=tmp)).astype(_F64)
            sl2 = _colsum(np.multiply(wl, t, out=tmp)).astype(_F64)
            score = np.where(sl2 > 0, slx * slx / sl2, 0.0)  # error reduction of the least-squares scale
            better = score > best
            best = np.where(better, score, best)
            best_s = np.where(better, slx / sl2, best_s)
    return best_s


def _quantize_scales(v: np.ndarray, d: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """round(v / d) per super-block row, clipped to lo..hi; 0 where d == 0."""
    df = d.astype(_F32)[:, None]
    q = np.divide(v, df, out=np.zeros(v.shape, _F32), where=df != 0)
    return np.clip(np.rint(q), lo, hi)


# ---------------------------------------------------------------------------------------------------- encoders

def _encode_legacy(x: np.ndarray, name: str) -> np.ndarray:
    """x [B, 32] -> blocks [B, type_size] of Q8_0, Q4_0, Q4_1, Q5_0 or Q5_1: gguf-py's `quantize_blocks` (ggml's
    reference), the same float32 steps in the same order, so the same bytes (tests hold them to `gguf.quants`),
    in fewer and cheaper passes (ns per value, one core here, in brackets).

    Q4_x/Q5_x take each block's max and min from x.T (1.3 for the transpose, 0.2 each), not along rows of 32 (2.0-2.2
    each; gguf-py's argmax of |x| 1.8); clip the uint8 codes (0.08; np.minimum: 0.8-1.2); and pair nibbles eight at a
    time in uint64 lanes. Q8_0 works on |x| (its max along rows costs what the transpose would, in less memory
    traffic, which two threads share) and puts x's sign bit back with integer ops (0.3; np.copysign: 1.0)."""
    n = x.shape[0]
    out = np.empty((n, GGML_QUANT_SIZES[GGMLQuantizationType[name]][1]), _U8)
    if name == "Q8_0":
        a = np.abs(x)
        d = a.max(axis=1) / _F32(127)
        _check_finite(d, d, name)  # a NaN or Inf in the block reaches its max
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, _F32(0), _F32(1) / d)
        # np_roundf (half away from zero: floor(a) + floor(2 * (a - floor(a)))) on |x * inv| = |x| * inv
        a *= inv[:, None]
        q = np.floor(a)
        np.subtract(a, q, out=a)
        a *= 2
        np.floor(a, out=a)
        q += a
        bits = q.view(np.uint32)  # q >= 0 (+0.0 included): its sign bit is x's, as np.copysign(q, x) sets it
        bits |= x.view(np.uint32) & _SIGN
        out[:, :2] = _f16_bytes(d.astype(_F16))
        out[:, 2:] = q.astype(np.int8).view(_U8)
        return out
    xt = np.ascontiguousarray(x.T)
    hi, lo = xt.max(axis=0), xt.min(axis=0)
    del xt
    _check_finite(lo, hi, name)  # a NaN or Inf in a block reaches its max or min
    with np.errstate(divide="ignore"):
        offset = name in ("Q4_1", "Q5_1")
        top = 15 if name.startswith("Q4") else 31
        if offset:  # d = (max - min) / top; codes from the min
            d = (hi - lo) / _F32(top)
            t = x - lo[:, None]
            half = _F32(0.5)
        else:  # d = (the value of largest magnitude) / -8 or -16; codes around it
            d = _signed_max(x, hi, lo) / _F32(-(top + 1) // 2)
            t = x.copy()
            half = _F32((top + 1) // 2 + 0.5)
        inv = np.where(d == 0, _F32(0), _F32(1) / d)
        t *= inv[:, None]
        t += half
        np.trunc(t, out=t)
        q = t.astype(_U8)  # t is in [0, 17) or [0, 33): exact
        np.clip(q, _U8(0), _U8(top), out=q)  # uint8 bounds: with Python ints numpy takes a 10x slower loop
    words = out.view(_WORDS)  # every field starts on an even byte: 16-bit columns copy faster than byte pairs
    words[:, 0] = d.astype(_F16).view(_WORDS)
    at = 1
    if offset:
        words[:, 1] = lo.astype(_F16).view(_WORDS)
        at = 2
    if top == 31:  # the fifth bits: bit i of byte k from value 8k + i
        words[:, at:at + 2] = np.packbits(q >> 4, axis=1, bitorder="little").view(_WORDS)
        at += 2
    lanes = q.view(_LANES)  # [B, 4]: values 0-7, 8-15, 16-23, 24-31
    low, high = lanes[:, :2], lanes[:, 2:]
    if top == 31:
        low, high = low & _NIBBLES, high & _NIBBLES
    words[:, at:] = (low | (high << _U64(4))).view(_WORDS)  # byte j: value j (low nibble), value j + 16 (high)
    return out


def _signed_max(x: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Per block (row of x), the value of largest magnitude, the first one where +m and -m both occur (gguf-py's
    argmax of |x|); for a block of zeros its first value, whose sign reaches the stored scale (-0.0 / -8 = +0.0)."""
    m = np.where(hi > -lo, hi, lo)
    tie = np.flatnonzero(hi == -lo)
    if len(tie):
        sub = x[tie]
        m[tie] = sub[np.arange(len(tie)), np.abs(sub).argmax(axis=1)]
    return m


def _encode_q45_k(x: np.ndarray, name: str, bits: int) -> np.ndarray:
    """x [B, QK_K] -> Q4_K (bits 4) or Q5_K (bits 5) blocks [B, type_size]."""
    nb, nmax, n_sub = x.shape[0], (1 << bits) - 1, QK_K // _SUB45
    xs = x.reshape(nb * n_sub, _SUB45)
    scale, offset = _fit_scale_min(xs, nmax, _STEPS[name], name)
    scale = scale.reshape(nb, n_sub)
    mins = (-offset).reshape(nb, n_sub)
    d = _to_f16(scale.max(axis=1) / 63, name)
    dmin = _to_f16(mins.max(axis=1) / 63, name)
    ls = _quantize_scales(scale, d, 0, 63)
    lm = _quantize_scales(mins, dmin, 0, 63)
    # the values, rounded against the scales exactly as a decoder will see them
    step = d.astype(_F32)[:, None] * ls
    shift = dmin.astype(_F32)[:, None] * lm
    inv = np.divide(1, step, out=np.zeros_like(step), where=step > 0)
    q = (x.reshape(nb, n_sub, _SUB45) + shift[..., None]) * inv[..., None]
    np.rint(q, out=q)
    np.clip(q, 0, nmax, out=q)
    q = q.astype(_U8)

    ls, lm = ls.astype(_U8), lm.astype(_U8)
    out = np.empty((nb, GGML_QUANT_SIZES[GGMLQuantizationType[name]][1]), _U8)
    out[:, 0:2] = _f16_bytes(d)
    out[:, 2:4] = _f16_bytes(dmin)
    sc = out[:, 4:4 + _K_SCALE_SIZE]
    half = n_sub // 2
    sc[:, 0:half] = ls[:, :half] | ((ls[:, half:] >> 4) << 6)
    sc[:, half:2 * half] = lm[:, :half] | ((lm[:, half:] >> 4) << 6)
    sc[:, 2 * half:] = (ls[:, half:] & 0xF) | ((lm[:, half:] & 0xF) << 4)
    pos = 4 + _K_SCALE_SIZE
    if bits == 5:
        # bit j of qh[l] = fifth bit of value l of sub-block j
        top = q >> 4
        qh = out[:, pos:pos + _SUB45]
        qh[:] = top[:, 0]
        for j in range(1, n_sub):
            qh |= top[:, j] << j
        pos += _SUB45
        q &= 0xF
    pairs = q.reshape(nb, n_sub // 2, 2, _SUB45)  # sub-blocks 2i (low nibble) and 2i+1 (high) share 32 bytes
    out[:, pos:] = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(nb, -1)
    return out


def _encode_q4_k(x):
    return _encode_q45_k(x, "Q4_K", 4)


def _encode_q5_k(x):
    return _encode_q45_k(x, "Q5_K", 5)


def _encode_q6_k(x: np.ndarray) -> np.ndarray:
    nb, n_sub = x.shape[0], QK_K // _SUB6
    scale = _fit_signed_scale(x.reshape(nb * n_sub, _SUB6), 32, _STEPS["Q6_K"], "Q6_K").reshape(nb, n_sub)
    # the scale of largest magnitude maps to -128, the others to -128..127
    peak = np.take_along_axis(scale, np.abs(scale).argmax(axis=1)[:, None], axis=1)[:, 0]
    d = _to_f16(np.where(np.abs(peak) >= _EPS, -peak / 128, 0), "Q6_K", away=True)
    sc = _quantize_scales(scale, d, -128, 127)
    step = d.astype(_F32)[:, None] * sc
    inv = np.divide(1, step, out=np.zeros_like(step), where=step != 0)
    q = x.reshape(nb, n_sub, _SUB6) * inv[..., None]
    np.rint(q, out=q)
    np.clip(q, -32, 31, out=q)
    q = (q + 32).astype(_U8).reshape(nb, QK_K)

    out = np.empty((nb, GGML_QUANT_SIZES[GGMLQuantizationType.Q6_K][1]), _U8)
    n_ql, n_qh = QK_K // 2, QK_K // 4
    # low nibbles: per half of 128 values, byte k holds values k (low) and k + 64 (high)
    lo4 = (q & 0xF).reshape(nb, 2, 2, 64)
    out[:, :n_ql] = (lo4[:, :, 0] | (lo4[:, :, 1] << 4)).reshape(nb, -1)
    # high 2 bits: per half, byte l holds values l, l + 32, l + 64, l + 96 at bits 0, 2, 4, 6
    hi2 = (q >> 4).reshape(nb, 2, 4, 32)
    out[:, n_ql:n_ql + n_qh] = (hi2[:, :, 0] | (hi2[:, :, 1] << 2) | (hi2[:, :, 2] << 4)
                                | (hi2[:, :, 3] << 6)).reshape(nb, -1)
    out[:, n_ql + n_qh:-2] = sc.astype(np.int8).view(_U8)
    out[:, -2:] = _f16_bytes(d)
    return out


# ---------------------------------------------------------------------------------------------------- decoders

def _scale_min_k4(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed bytes [B, 12] -> 6-bit scales and mins, float32 [B, 8]."""
    a, m, hi = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scale = np.concatenate([a & 0x3F, (hi & 0xF) | ((a >> 6) << 4)], axis=1)
    mins = np.concatenate([m & 0x3F, (hi >> 4) | ((m >> 6) << 4)], axis=1)
    return scale.astype(_F32), mins.astype(_F32)


def _decode_legacy(blocks: np.ndarray, name: str) -> np.ndarray:
    """Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 blocks [B, type_size] -> float32 [B, 32]: gguf-py's `dequantize_blocks`, value for
    value (d * code, + min for Q4_1/Q5_1; every product exact), in 3-4x fewer ns: the nibbles split eight to a
    uint64 lane, the fifth bits by `np.unpackbits`."""
    d = _read_f16(blocks[:, 0:2])
    if name == "Q8_0":
        out = blocks[:, 2:].view(np.int8).astype(_F32)
        out *= d
        return out
    offset, five = name in ("Q4_1", "Q5_1"), name.startswith("Q5")
    at = 4 if offset else 2
    if five:
        qh = blocks[:, at:at + 4]
        at += 4
    lanes = np.ascontiguousarray(blocks[:, at:]).view(_LANES)  # [B, 2]: bytes 0-7 and 8-15
    q = np.empty((blocks.shape[0], 4), _LANES)  # -> values 0-15 (low nibbles), then 16-31 (high)
    np.bitwise_and(lanes, _NIBBLES, out=q[:, :2])
    np.right_shift(lanes, _U64(4), out=q[:, 2:])
    q[:, 2:] &= _NIBBLES
    q = q.view(_U8)
    if five:
        q |= np.unpackbits(qh, axis=1, bitorder="little") << _U8(4)
    v = q.astype(_F32)
    if not offset:
        v -= _F32(16 if five else 8)  # the signed code, exactly
    v *= d
    if offset:
        v += _read_f16(blocks[:, 2:4])
    return v


def _decode_q45_k(blocks: np.ndarray, bits: int) -> np.ndarray:
    nb, n_sub = blocks.shape[0], QK_K // _SUB45
    d, dmin = _read_f16(blocks[:, 0:2]), _read_f16(blocks[:, 2:4])
    scale, mins = _scale_min_k4(blocks[:, 4:4 + _K_SCALE_SIZE])
    pos = 4 + _K_SCALE_SIZE
    qs = blocks[:, -QK_K // 2:].reshape(nb, n_sub // 2, 1, _SUB45)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(nb, n_sub, _SUB45)
    if bits == 5:
        qh = blocks[:, pos:pos + _SUB45].reshape(nb, 1, _SUB45)
        q |= ((qh >> np.arange(n_sub, dtype=_U8)[:, None]) & 1) << 4
    step = (d * scale)[..., None]
    shift = (dmin * mins)[..., None]
    return (step * q.astype(_F32) - shift).reshape(nb, QK_K)


def _decode_q6_k(blocks: np.ndarray) -> np.ndarray:
    nb, n_ql, n_qh = blocks.shape[0], QK_K // 2, QK_K // 4
    ql = blocks[:, :n_ql].reshape(nb, 2, 1, 64)
    lo4 = np.concatenate([ql & 0xF, ql >> 4], axis=2).reshape(nb, 2, 4, 32)
    qh = blocks[:, n_ql:n_ql + n_qh].reshape(nb, 2, 1, 32)
    hi2 = (qh >> np.array([0, 2, 4, 6], _U8)[:, None]) & 3
    q = (lo4 | (hi2 << 4)).view(np.int8) - np.int8(32)
    sc = np.ascontiguousarray(blocks[:, n_ql + n_qh:-2]).view(np.int8).astype(_F32)
    step = (_read_f16(blocks[:, -2:]) * sc)[..., None]
    return (step * q.reshape(nb, QK_K // _SUB6, _SUB6).astype(_F32)).reshape(nb, QK_K)


_ENCODERS = {"Q4_K": _encode_q4_k, "Q5_K": _encode_q5_k, "Q6_K": _encode_q6_k}
_DECODERS = {"Q4_K": lambda b: _decode_q45_k(b, 4), "Q5_K": lambda b: _decode_q45_k(b, 5), "Q6_K": _decode_q6_k}
