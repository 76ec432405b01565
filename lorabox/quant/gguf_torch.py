"""GGUF block quantization and decoding in torch, on whatever device the values are: the same bytes as
`lorabox.quant.gguf_quants.quantize` and the same floats as `gguf_quants.dequantize`, for the merge's GPU path
(`TorchCompute.gguf`, `TorchCompute.requantize`).

Every step is the CPU path's float32/float64 arithmetic in the same order, so the bytes do not depend on the
device (tests hold this module to `gguf_quants` on torch's CPU device, for every type):
- Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 follow gguf-py's `quantize_blocks` (which `gguf_quants` repeats in fewer passes),
  ggml's rounding included (`np_roundf` for Q8_0, trunc(v + 8.5) for Q4_0, ...).
- Q4_K, Q5_K, Q6_K follow `gguf_quants`' own search; its sums run in a fixed pairwise order (`_colsum`) there and
  here, since numpy's and torch's reductions each pick their own order.
- Divisions are tensor by tensor: CUDA divides by a Python number as a multiply by its reciprocal, which is not
  the correctly rounded quotient numpy computes (`_div`).
- A float64 value becomes float16 through float32 (torch's cast; `gguf_quants._to_f16` does the same), and the
  float32 square root goes through float64 (torch's own float32 `sqrt` on the CPU is not correctly rounded).

- Decoding is exact products of a float16 scale and small integers (d * q; K-quants' d * scale * q fits 24 bits),
  then at most one rounded add or subtract, so it gives gguf-py's floats on any device, fused or not.

    data = quantize(x, "Q4_K")     # x: float32 tensor, any device; uint8 [..., row_bytes] on that device
    x = dequantize(data, "Q4_K", shape)  # float32 [shape], where `data` is
"""
from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, QK_K

from . import gguf_quants as gq

CHUNK = 1 << 24  # values per step: the K-quant search holds about ten float32 temporaries of a step (640 MB on
# the device), and launches some 150 kernels per step, so steps are few: three for a FLUX.1 MLP weight


def quantize(x, qtype: str):
    """`gguf_quants.quantize` of the float32 tensor `x`, computed where `x` is: uint8 [*x.shape[:-1], row_bytes]."""
    qt = gq._qtype(qtype)
    bs, ts = GGML_QUANT_SIZES[qt]
    gq._check_shape(tuple(x.shape), qt)
    blocks = x.reshape(-1, bs).to(torch.float32)
    gq._check_finite(blocks, blocks, qt)
    encode = _ENCODERS[qt.name]
    out = torch.empty((blocks.shape[0], ts), dtype=torch.uint8, device=x.device)
    step = max(1, CHUNK // bs)
    for a in range(0, blocks.shape[0], step):
        out[a:a + step] = encode(blocks[a:a + step])
    return out.reshape(*x.shape[:-1], x.shape[-1] // bs * ts)


def dequantize(data, qtype: str, shape):
    """`gguf_quants.dequantize` of the uint8 tensor `data` (exactly the tensor's blocks), computed where `data` is:
    float32 of `shape`."""
    qt = gq._qtype(qtype)
    bs, ts = GGML_QUANT_SIZES[qt]
    shape = tuple(int(n) for n in shape)
    n_blocks = gq._check_blocks(data.numel(), shape, qt)
    blocks = data.reshape(n_blocks, ts)
    decode = _DECODERS[qt.name]
    out = torch.empty((n_blocks, bs), dtype=torch.float32, device=data.device)
    step = max(1, CHUNK // bs)
    for a in range(0, n_blocks, step):
        out[a:a + step] = decode(blocks[a:a + step])
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------------- helpers

def _div(a, b):
    """a / b, correctly rounded, for a Python number or tensor `b` (as a tensor: see the module docstring)."""
    if not torch.is_tensor(b):
        b = torch.full_like(a, b)
    return a / b


def _recip(a, zero):
    """1/a where `zero` is False, else 0 (numpy's `np.divide(1, a, where=...)` with a zero-filled `out`)."""
    return torch.where(zero, torch.zeros_like(a), _div(torch.ones_like(a), a))


def _f16_bytes(h):
    """float16 [n] -> its little-endian bytes, uint8 [n, 2]."""
    return h.reshape(-1, 1).view(torch.uint8)


def _nibbles(lo, hi):
    return lo | (hi << 4)


def _bits_le(bits):
    """[n, 32] of 0/1 -> uint8 [n, 4], bit i of byte j from value 8j + i (numpy's packbits, little bit order)."""
    b = bits.reshape(bits.shape[0], 4, 8)
    out = b[..., 0].clone()
    for i in range(1, 8):
        out |= b[..., i] << i
    return out


def _np_roundf(v):
    """gguf-py's `np_roundf`: round half away from zero, in the same float32 steps."""
    a = v.abs()
    floored = torch.floor(a)
    return torch.sign(v) * (floored + torch.floor(2 * (a - floored)))


# ---------------------------------------------------------------------------------------------------- legacy types

def _q8_0(b):
    d = _div(b.abs().amax(dim=1, keepdim=True), 127)
    qs = _np_roundf(b * _recip(d, d == 0))
    return torch.cat([_f16_bytes(d.to(torch.float16)), qs.to(torch.int8).view(torch.uint8)], dim=1)


def _signed_max(b):
    """The value of largest magnitude per block (the first such, as numpy's argmax takes it)."""
    return b.gather(1, b.abs().argmax(dim=1, keepdim=True))


def _q4_0(b):
    d = _div(_signed_max(b), -8)
    qs = torch.trunc(b * _recip(d, d == 0) + 8.5).to(torch.uint8).clamp(0, 15)
    return torch.cat([_f16_bytes(d.to(torch.float16)), _nibbles(qs[:, :16], qs[:, 16:])], dim=1)


def _q4_1(b):
    hi, lo = b.amax(dim=1, keepdim=True), b.amin(dim=1, keepdim=True)
    d = _div(hi - lo, 15)
    qs = torch.trunc((b - lo) * _recip(d, d == 0) + 0.5).to(torch.uint8).clamp(0, 15)
    return torch.cat([_f16_bytes(d.to(torch.float16)), _f16_bytes(lo.to(torch.float16)),
                      _nibbles(qs[:, :16], qs[:, 16:])], dim=1)


def _q5_0(b):
    d = _div(_signed_max(b), -16)
    q = torch.trunc(b * _recip(d, d == 0) + 16.5).to(torch.uint8).clamp(0, 31)
    return torch.cat([_f16_bytes(d.to(torch.float16)), _bits_le(q >> 4),
                      _nibbles(q[:, :16] & 0xF, q[:, 16:])], dim=1)


def _q5_1(b):
    hi, lo = b.amax(dim=1, keepdim=True), b.amin(dim=1, keepdim=True)
    d = _div(hi - lo, 31)
    q = torch.trunc((b - lo) * _recip(d, d == 0) + 0.5).to(torch.uint8).clamp(0, 31)
    return torch.cat([_f16_bytes(d.to(torch.float16)), _f16_bytes(lo.to(torch.float16)),
                      _bits_le(q >> 4), _nibbles(q[:, :16] & 0xF, q[:, 16:])], dim=1)


# ---------------------------------------------------------------------------------------------------- K-quants

def _colsum(a):
    """`gguf_quants._colsum`: the sum over axis 0 of [2^k, S] by halving."""
    n = a.shape[0]
    while n > 1:
        n //= 2
        a = a[:n] + a[n:2 * n]
    return a[0]


def _fit_scale_min(x, nmax: int, steps):
    """`gguf_quants._fit_scale_min` of x [S, n], on x.T."""
    x = x.t().contiguous()
    lo, hi = x.amin(dim=0), x.amax(dim=0)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    rng = hi - lo
    inv_rng = _recip(rng, ~(rng > 1e-30))
    xs = x - lo
    # float32 sqrt through float64: torch's CPU float32 sqrt is not correctly rounded (a fifth of values one ulp off,
    # measured), numpy's is; the float64 root rounded to float32 is the correctly rounded one
    w = x.abs() + torch.sqrt(_div(_colsum(x * x), float(x.shape[0])).double()).to(torch.float32)
    swx = _colsum(w * x).double()
    sw = _colsum(w).double()
    best_e = torch.full_like(sw, float("inf"))
    best_s = _div(rng, float(nmax)).double()
    best_m = lo.double()
    for r in steps:
        t = torch.round(xs * (inv_rng * torch.tensor(nmax + r, dtype=torch.float32, device=x.device)))
        if r > 0.4:
            t = t.clamp(0, nmax)
        wl = w * t
        sl2 = _colsum(wl * t).double()
        slx = _colsum(wl * x).double()
        sl = _colsum(wl).double()
        det = sw * sl2 - sl * sl
        s = _div(sw * slx - swx * sl, det)
        m = _div(sl2 * swx - sl * slx, det)
        s = torch.where(m > 0, _div(slx, sl2), s)
        m = torch.minimum(m, torch.zeros_like(m))
        e = -(s * slx + m * swx)
        better = (det > 1e-6 * sw * sl2) & (e < best_e)
        best_e = torch.where(better, e, best_e)
        best_s = torch.where(better, s, best_s)
        best_m = torch.where(better, m, best_m)
    return torch.maximum(best_s, torch.zeros_like(best_s)), best_m


def _fit_signed_scale(x, nmax: int, steps):
    """`gguf_quants._fit_signed_scale` of x [S, n], on x.T."""
    x = x.t().contiguous()
    lo, hi = x.amin(dim=0), x.amax(dim=0)
    vmax = torch.where(hi >= -lo, hi, lo)
    neg_inv = torch.where(vmax.abs() >= gq._EPS, _div(torch.full_like(vmax, -1.0), vmax), torch.zeros_like(vmax))
    w = x * x
    best = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    best_s = torch.zeros_like(best)
    for r in steps:
        t = torch.round(x * (neg_inv * torch.tensor(nmax + r, dtype=torch.float32, device=x.device)))
        t = t.clamp(-nmax, nmax - 1)
        wl = w * t
        slx = _colsum(wl * x).double()
        sl2 = _colsum(wl * t).double()
        score = torch.where(sl2 > 0, _div(slx * slx, sl2), torch.zeros_like(sl2))
        better = score > best
        best = torch.where(better, score, best)
        best_s = torch.where(better, _div(slx, sl2), best_s)
    return best_s


def _to_f16(v, qt: str, away: bool = False):
    """`gguf_quants._to_f16`: float64 -> float32 -> float16; `away` steps a short result one unit outwards."""
    h = v.to(torch.float32).to(torch.float16)
    if away:
        short = h.to(torch.float32).abs().double() < v.abs()
        # one unit away from zero: the magnitude's bit pattern plus one (h has v's sign, zeros included)
        h = torch.where(short, (h.view(torch.int16) + 1).view(torch.float16), h)
    gq._check_scales(h, v, qt)
    return h


def _quantize_scales(v, d, lo: int, hi: int):
    """`gguf_quants._quantize_scales`: round(v / d) (float64 quotient, rounded to float32), clipped; 0 where d == 0."""
    df = d.to(torch.float32).double()[:, None].expand_as(v)
    q = torch.where(df != 0, _div(v, df).to(torch.float32), torch.zeros(v.shape, dtype=torch.float32, device=v.device))
    return torch.round(q).clamp(lo, hi)


def _q45_k(x, name: str, bits: int):
    nb, nmax, n_sub, sub = x.shape[0], (1 << bits) - 1, QK_K // gq._SUB45, gq._SUB45
    scale, offset = _fit_scale_min(x.reshape(nb * n_sub, sub), nmax, gq._STEPS[name])
    scale = scale.reshape(nb, n_sub)
    mins = (-offset).reshape(nb, n_sub)
    d = _to_f16(_div(scale.amax(dim=1), 63.0), name)
    dmin = _to_f16(_div(mins.amax(dim=1), 63.0), name)
    ls = _quantize_scales(scale, d, 0, 63)
    lm = _quantize_scales(mins, dmin, 0, 63)
    step = d.to(torch.float32)[:, None] * ls
    shift = dmin.to(torch.float32)[:, None] * lm
    inv = _recip(step, ~(step > 0))
    q = torch.round((x.reshape(nb, n_sub, sub) + shift[..., None]) * inv[..., None]).clamp(0, nmax).to(torch.uint8)

    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    half = n_sub // 2
    parts = [_f16_bytes(d), _f16_bytes(dmin),
             ls[:, :half] | ((ls[:, half:] >> 4) << 6),
             lm[:, :half] | ((lm[:, half:] >> 4) << 6),
             (ls[:, half:] & 0xF) | ((lm[:, half:] & 0xF) << 4)]
    if bits == 5:
        top = q >> 4
        qh = top[:, 0].clone()
        for j in range(1, n_sub):
            qh |= top[:, j] << j
        parts.append(qh)
        q = q & 0xF
    pairs = q.reshape(nb, n_sub // 2, 2, sub)
    parts.append(_nibbles(pairs[:, :, 0], pairs[:, :, 1]).reshape(nb, -1))
    return torch.cat(parts, dim=1)


def _q6_k(x):
    nb, n_sub, sub = x.shape[0], QK_K // gq._SUB6, gq._SUB6
    scale = _fit_signed_scale(x.reshape(nb * n_sub, sub), 32, gq._STEPS["Q6_K"]).reshape(nb, n_sub)
    peak = scale.gather(1, scale.abs().argmax(dim=1, keepdim=True))[:, 0]
    d = _to_f16(torch.where(peak.abs() >= gq._EPS, _div(-peak, 128.0), torch.zeros_like(peak)), "Q6_K",
                away=True)
    sc = _quantize_scales(scale, d, -128, 127)
    step = d.to(torch.float32)[:, None] * sc
    inv = _recip(step, step == 0)
    q = torch.round(x.reshape(nb, n_sub, sub) * inv[..., None]).clamp(-32, 31)
    q = (q + 32).to(torch.uint8).reshape(nb, QK_K)

    lo4 = (q & 0xF).reshape(nb, 2, 2, 64)
    hi2 = (q >> 4).reshape(nb, 2, 4, 32)
    return torch.cat([
        _nibbles(lo4[:, :, 0], lo4[:, :, 1]).reshape(nb, -1),
        (hi2[:, :, 0] | (hi2[:, :, 1] << 2) | (hi2[:, :, 2] << 4) | (hi2[:, :, 3] << 6)).reshape(nb, -1),
        sc.to(torch.int8).view(torch.uint8),
        _f16_bytes(d)], dim=1)


# ---------------------------------------------------------------------------------------------------- decoding
# gguf-py's `dequantize_blocks` (legacy types) and `gguf_quants`' K-quant decoders, value for value

def _f16(cols):
    """Two byte columns [n, 2] -> float32 [n, 1]."""
    return cols.contiguous().view(torch.float16).to(torch.float32)


def _unnibble(qs):
    """[n, 16] packed bytes -> [n, 32]: the low nibbles are values 0-15, the high ones 16-31."""
    return torch.cat([qs & 0xF, qs >> 4], dim=1)


def _high_bits(qh):
    """[n, 4] bytes -> [n, 32] of 0/1, value 8j + i from bit i of byte j (the inverse of `_bits_le`)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh[:, :, None] >> shifts) & 1).reshape(qh.shape[0], 32)


def _d_q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * _f16(b[:, :2])


def _d_q4_0(b):
    return _f16(b[:, :2]) * (_unnibble(b[:, 2:]).to(torch.float32) - 8)


def _d_q4_1(b):
    return _f16(b[:, :2]) * _unnibble(b[:, 4:]).to(torch.float32) + _f16(b[:, 2:4])


def _d_q5_0(b):
    q = _unnibble(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.to(torch.float32) - 16)


def _d_q5_1(b):
    q = _unnibble(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.to(torch.float32) + _f16(b[:, 2:4])


def _d_q45_k(b, bits: int):
    nb, n_sub, sub = b.shape[0], QK_K // gq._SUB45, gq._SUB45
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc = b[:, 4:4 + gq._K_SCALE_SIZE]
    a, m, hi = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scale = torch.cat([a & 0x3F, (hi & 0xF) | ((a >> 6) << 4)], dim=1).to(torch.float32)
    mins = torch.cat([m & 0x3F, (hi >> 4) | ((m >> 6) << 4)], dim=1).to(torch.float32)
    qs = b[:, -QK_K // 2:].reshape(nb, n_sub // 2, 1, sub)
    q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(nb, n_sub, sub)
    if bits == 5:
        pos = 4 + gq._K_SCALE_SIZE
        shifts = torch.arange(n_sub, dtype=torch.uint8, device=b.device)[:, None]
        q = q | (((b[:, None, pos:pos + sub] >> shifts) & 1) << 4)
    step = (d * scale)[..., None]
    shift = (dmin * mins)[..., None]
    return (step * q.to(torch.float32) - shift).reshape(nb, QK_K)


def _d_q6_k(b):
    nb, n_ql, n_qh = b.shape[0], QK_K // 2, QK_K // 4
    ql = b[:, :n_ql].reshape(nb, 2, 1, 64)
    lo4 = torch.cat([ql & 0xF, ql >> 4], dim=2).reshape(nb, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device)[:, None]
    hi2 = (b[:, n_ql:n_ql + n_qh].reshape(nb, 2, 1, 32) >> shifts) & 3
    q = (lo4 | (hi2 << 4)).to(torch.float32) - 32
    sc = b[:, n_ql + n_qh:-2].contiguous().view(torch.int8).to(torch.float32)
    step = (_f16(b[:, -2:]) * sc)[..., None]
    return (step * q.reshape(nb, QK_K // gq._SUB6, gq._SUB6)).reshape(nb, QK_K)


_DECODERS = {
    "Q8_0": _d_q8_0, "Q4_0": _d_q4_0, "Q4_1": _d_q4_1, "Q5_0": _d_q5_0, "Q5_1": _d_q5_1,
    "Q4_K": lambda b: _d_q45_k(b, 4), "Q5_K": lambda b: _d_q45_k(b, 5), "Q6_K": _d_q6_k,
}

_ENCODERS = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q4_K": lambda x: _q45_k(x, "Q4_K", 4),
    "Q5_K": lambda x: _q45_k(x, "Q5_K", 5),
    "Q6_K": _q6_k,
}
assert set(_ENCODERS) == set(_DECODERS) == set(gq.QTYPES)
