"""float32 -> fp8 (e4m3fn, e5m2) rounding and ComfyUI's scaled-fp8 layouts, in numpy only.

This is the CPU path of the merge engine: no torch (`stochastic_bits_torch`, the device's twin of the stochastic
steps, takes torch as an argument). Bits are held as uint8, like `lorabox.tensor.Tensor`
holds them (safetensors dtypes "F8_E4M3" = torch.float8_e4m3fn, "F8_E5M2" = torch.float8_e5m2).

Rounding (`round_fp8`)
  Both modes saturate first, as ComfyUI does before it casts (`torch.clamp(x, -max, max)`): |x| > max and
  ±inf become ±max (448 for e4m3fn, 57344 for e5m2). NaN stays NaN (0x7F, with the input's sign bit).
  - round to nearest, ties to even: bit for bit what `torch.clamp(x, -max, max).to(float8)` gives, for
    every float32 (zeros keep their sign; float32 subnormals included).
  - stochastic: rounds |x| up to the next fp8 value with probability (|x| - lo) / (hi - lo), else down to
    lo, so E[q] = x. The probability is exact (an integer uniform draw added below the kept bits, then
    truncation) whenever |x| >= 2^(man-8) times the smallest fp8 subnormal (2^-14 for e4m3fn, 2^-22
    for e5m2); below that it falls short by less than 2^-(31-man) of that subnormal step (2^-37 and
    2^-45 in absolute terms).
    The random stream is numpy's PCG64 seeded with `seed` (ComfyUI's convention: `seed_for_key(name)`,
    the CRC32 of the weight's key), one 32-bit draw per element in flat (C) order, drawn in chunks of
    `CHUNK` elements, so the result depends only on (seed, values), not on the shape or the chunking,
    and memory stays bounded. It is NOT ComfyUI's stream (torch.Generator + torch.rand over 4096²
    slices, `comfy/float.py`); bit-identical stochastic rounding with ComfyUI is not a goal, the
    statistics are the same (ComfyUI first rounds to float16 and draws float16 noise, so where the two
    differ, ours is the unbiased one).

Scaled fp8 (ComfyUI), W = dequant(q) * scale, scale a float32 scalar per layer
  - legacy: marker `<prefix>scaled_fp8` (an empty tensor whose dtype names the fp8 kind; float32 means
    e4m3fn; 2 elements means "no fp8 matmul"), per layer `<layer>.scale_weight`, optional
    `<layer>.scale_input` (`comfy/ops.py::scaled_fp8_ops`).
  - comfy_quant: per layer `<layer>.comfy_quant`, a uint8 tensor holding UTF-8 JSON
    `{"format": "float8_e4m3fn", ...}` (or the header metadata `_quantization_metadata` =
    `{"format_version": "1.0", "layers": {layer: {...}}}`), `<layer>.weight_scale`, optional
    `<layer>.input_scale` (`comfy/ops.py::mixed_precision_ops`, `comfy/quant_ops.py`). Newer ComfyUI
    converts legacy files to this on load (`comfy/utils.py::convert_old_quants`: scale_weight ->
    weight_scale, scale_input -> input_scale, dropped when 1.0; every layer labelled float8_e4m3fn).
"""
from __future__ import annotations

import dataclasses
import json
import zlib
from typing import Callable, Mapping

import numpy as np

from ..tensor import Tensor

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
COMFY_FORMATS = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
FORMAT_DTYPES = {v: k for k, v in COMFY_FORMATS.items()}
CHUNK = 1 << 16  # elements per step (even: the random stream does not depend on it)
SEGMENT = 16 * CHUNK  # at most this many elements per parallel task (a multiple of CHUNK)
METADATA_KEY = "_quantization_metadata"


@dataclasses.dataclass(frozen=True)
class _Spec:
    man: int  # mantissa bits
    bias: int
    max: float  # largest finite value
    nan: int  # the NaN code torch writes (sign bit apart); also the largest code any value maps to


_SPECS = {"F8_E4M3": _Spec(3, 7, 448.0, 0x7F), "F8_E5M2": _Spec(2, 15, 57344.0, 0x7F)}


def _spec(dtype: str) -> _Spec:
    try:
        return _SPECS[dtype]
    except KeyError:
        raise ValueError(f"not an fp8 dtype: {dtype!r} (expected one of {FP8_DTYPES})") from None


def fp8_max(dtype: str) -> float:
    """The largest finite value of `dtype` (torch.finfo(...).max): 448.0 or 57344.0."""
    return _spec(dtype).max


def seed_for_key(name: str) -> int:
    """The stochastic-rounding seed of the weight `name`: CRC32 of its UTF-8 bytes.

    Equal to ComfyUI's `comfy.model_patcher.string_to_seed(name)` for every ASCII name (all real weight
    keys); ComfyUI XORs whole code points into its CRC register, so non-ASCII names differ."""
    return zlib.crc32(name.encode("utf-8"))


def round_fp8(x: np.ndarray, dtype: str, *, stochastic: bool = False, seed: int | None = None, threads: int = 1,
              pool=None) -> np.ndarray:
    """Round `x` (any real dtype; computed on its float32 values) to fp8 bits (uint8, same shape).

    Saturates to ±max first (see the module doc); `stochastic=True` needs `seed` (use `seed_for_key`).
    `threads` (or a `pool` of that many threads) round segments of whole chunks in parallel, each from its
    own place in the random stream, so the bits do not depend on them. A non-contiguous `x` is copied
    once; otherwise memory beyond input and output stays under 2 MB per thread."""
    return _round(x, _spec(dtype), stochastic, seed, None, threads, pool)


def _round(x, spec: _Spec, stochastic: bool, seed: int | None, multiplier, threads: int = 1,
           pool=None) -> np.ndarray:
    """round_fp8 of float32(x) * multiplier (a float32 scalar, or None for 1), chunk by chunk."""
    from ..parallel import run_chunks

    if stochastic and seed is None:
        raise ValueError("stochastic rounding needs a seed (seed_for_key(weight name))")
    x = np.asarray(x)
    flat = x.reshape(-1)
    out = np.empty(flat.shape, np.uint8)
    step = _segment(flat.size, threads)
    seeds = np.random.SeedSequence(seed) if stochastic else None

    def segment(first: int) -> None:
        work = _Work(min(CHUNK, flat.size), spec, stochastic, multiplier)
        rng = _stream_at(seeds, first) if stochastic else None
        with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf inputs are expected
            for start in range(first, min(flat.size, first + step), CHUNK):
                chunk, dest = flat[start:start + CHUNK], out[start:start + CHUNK]
                if rng is None:
                    _rne_chunk(chunk, dest, work)
                else:
                    # one 32-bit draw per element, in flat order (an odd chunk can only be the last one)
                    draws = rng.random_raw((chunk.size + 1) // 2).astype("<u8", copy=False)
                    _stochastic_chunk(chunk, dest, work, draws.view("<u4")[:chunk.size])

    run_chunks(segment, range(0, flat.size, step), threads, pool)
    return out.reshape(x.shape)


def _segment(n: int, threads: int) -> int:
    """Elements per parallel task: whole chunks, about four tasks per thread where the array has that many chunks
    (most SDXL weights are 0.1-1.6 M elements: fixed 1 M segments left 16 threads with one or two tasks), at most
    SEGMENT. The bits do not depend on it."""
    per_task = -(-n // max(1, 4 * threads))
    return min(SEGMENT, max(CHUNK, -(-per_task // CHUNK) * CHUNK))


def _stream_at(seeds: np.random.SeedSequence, first: int) -> np.random.PCG64:
    """The random stream of a seed (`PCG64(seed)`, given as its SeedSequence) where element `first` (a multiple of
    CHUNK) takes its draw: every chunk before it took CHUNK / 2 64-bit outputs (CHUNK is even). The caller makes
    the SeedSequence once per array: making it is 35 of the 55 us a new stream costs, under the GIL, and a weight
    has up to 64 segments with 16 threads (drawing for 1.6 M elements on 16 threads of 2 cores: 6.3-11.1 ms with a
    SeedSequence per segment, 5.1-5.4 ms with one)."""
    rng = np.random.PCG64(seeds)
    rng.advance(first // 2)
    return rng


def stochastic_draws(n: int, seed: int) -> np.ndarray:
    """The uint32 draws `round_fp8(stochastic=True, seed=seed)` gives the elements of an n-element array, in flat
    order: the stream's 64-bit outputs split into 32-bit halves, low half first (every chunk but the last takes
    CHUNK / 2 outputs). The oracle of the device's stream (`lorabox.quant.pcg64_torch.draws`)."""
    raw = np.random.PCG64(np.random.SeedSequence(seed)).random_raw((n + 1) // 2).astype("<u8", copy=False)
    return raw.view("<u4")[:n]


class _Work:
    """Buffers reused by every chunk of one call: allocating per chunk costs page faults, which on a
    small VM cost more than the arithmetic."""

    def __init__(self, n: int, spec: _Spec, stochastic: bool, multiplier):
        self.spec = spec
        self.multiplier = multiplier
        self.f32 = np.empty(n, np.float32)
        self.u32 = [np.empty(n, np.uint32) for _ in range(2)]
        self.mask = np.empty(n, np.bool_)
        self.fixed = np.empty(n if stochastic else 0, np.uint32)
        if not stochastic and spec not in _RNE_TABLES:
            _RNE_TABLES[spec] = _rne_table(spec)

    def load(self, src: np.ndarray) -> np.ndarray:
        """float32(src) * multiplier, in the float32 buffer."""
        x = self.f32[:src.size]
        if self.multiplier is None:
            np.copyto(x, src, casting="unsafe")
        else:
            np.multiply(src, self.multiplier, out=x, dtype=np.float32, casting="unsafe")
        return x


_RNE_TABLES: dict[_Spec, np.ndarray] = {}


def _rne_table(spec: _Spec) -> np.ndarray:
    """Round to nearest even depends only on the bits down to the round bit (sign, exponent, mantissa to
    one below the kept ones) and on whether any lower bit is set (sticky): a 2^14-entry (e4m3fn) or
    2^13-entry (e5m2) table indexed by them holds every answer. Built by `_rne` on one representative
    of each class."""
    low = 22 - spec.man
    top = np.arange(1 << (32 - low), dtype=np.uint32)
    reps = np.stack([top << low, (top << low) | 1], axis=1).reshape(-1)  # index = top * 2 + sticky
    with np.errstate(invalid="ignore"):
        return _rne(reps.view(np.float32).copy(), spec)


def _rne_chunk(src: np.ndarray, out: np.ndarray, work: _Work) -> None:
    n = src.size
    if src.dtype == np.float32 and work.multiplier is None:
        bits = src.view(np.uint32)  # read only: float32 input is not copied
    else:
        bits = work.load(src).view(np.uint32)
    low = 22 - work.spec.man  # bits below the round bit of the normal range; finer than any subnormal's
    index, sticky = (b[:n] for b in work.u32)
    np.right_shift(bits, low, out=index)
    np.left_shift(index, 1, out=index)
    np.bitwise_and(bits, (1 << low) - 1, out=sticky)
    np.add(sticky, (1 << low) - 1, out=sticky)  # carries into bit `low` exactly when some low bit is set
    np.right_shift(sticky, low, out=sticky)
    np.bitwise_or(index, sticky, out=index)
    np.take(_RNE_TABLES[work.spec], index, out=out)


def _split(x: np.ndarray, spec: _Spec, sign: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sign bit as uint32 0/0x80, |x| saturated to max as uint32 bits); x is overwritten."""
    bits = x.view(np.uint32)
    sign = np.right_shift(bits, 24, out=sign)
    np.bitwise_and(sign, 0x80, out=sign)
    np.abs(x, out=x)
    np.minimum(x, np.float32(spec.max), out=x)  # NaN stays NaN
    return sign, bits


def _rne(x: np.ndarray, spec: _Spec) -> np.ndarray:
    """Round to nearest even in arithmetic (builds the table `_rne_chunk` looks up)."""
    sign, bits = _split(x, spec)
    shift = 23 - spec.man
    # normal fp8 range: round the float32 bit pattern to `man` mantissa bits, ties to even, then rebias
    code = bits >> shift
    code &= 1
    code += bits
    code += (1 << (shift - 1)) - 1
    code >>= shift
    code -= (127 - spec.bias) << spec.man  # wraps for the subnormal range, which is replaced below
    # fp8 subnormal range: adding 2^(24-bias-man) leaves float32 steps of exactly one fp8 subnormal, and
    # float32 addition rounds to nearest even
    magic = np.float32(2.0 ** (24 - spec.bias - spec.man))
    low = x < np.float32(2.0 ** (1 - spec.bias))
    sub = (x + magic).view(np.uint32)
    sub -= magic.view(np.uint32)
    np.copyto(code, sub, where=low)
    np.minimum(code, spec.nan, out=code)  # NaN: every NaN pattern lands above the largest finite code
    code |= sign
    return code.astype(np.uint8)


def _stochastic_chunk(src: np.ndarray, out: np.ndarray, work: _Work, draws: np.ndarray) -> None:
    spec, n = work.spec, src.size
    x = work.load(src)
    sign, code = (b[:n] for b in work.u32)
    sign, bits = _split(x, spec, sign)
    shift = 23 - spec.man
    # normal fp8 range: add a uniform integer below one step (the draw's top `shift` bits) to the bit
    # pattern and truncate: it carries into the kept bits with probability exactly discarded / 2^shift
    np.right_shift(draws, 32 - shift, out=code)
    np.add(code, bits, out=code)
    np.right_shift(code, shift, out=code)
    np.subtract(code, (127 - spec.bias) << spec.man, out=code)  # wraps below; replaced there
    low = np.less(x, np.float32(2.0 ** (1 - spec.bias)), out=work.mask[:n])
    if low.any():
        # fp8 subnormal range: |x| in 31-bit fixed point with (31 - man) bits below one subnormal step
        # (float32 scaling by a power of two is exact; the conversion drops what lies below 2^-(31-man)
        # of a step), plus a uniform integer of as many bits, then truncate
        fixed = work.fixed[:n]
        np.multiply(x, np.float32(2.0 ** (spec.bias + 30)), out=x)  # |x| / step * 2^(31 - man)
        np.copyto(fixed, x, casting="unsafe")  # (outside this range it overflows: not used)
        np.right_shift(draws, spec.man + 1, out=draws)
        np.add(fixed, draws, out=fixed)
        np.right_shift(fixed, 31 - spec.man, out=fixed)
        select = draws  # spent: reuse as a 0 / all-ones mask (a masked copy is 20x slower than this)
        np.copyto(select, low)
        np.subtract(0, select, out=select)
        np.bitwise_xor(fixed, code, out=fixed)
        np.bitwise_and(fixed, select, out=fixed)
        np.bitwise_xor(code, fixed, out=code)
    np.minimum(code, spec.nan, out=code)  # NaN: every NaN pattern lands above the largest finite code
    np.bitwise_or(code, sign, out=code)
    np.copyto(out, code, casting="unsafe")


def stochastic_bits_torch(torch, x, draws, dtype: str):
    """`_stochastic_chunk` in torch, for a device (`TorchCompute`): float32 `x`, its uint32 draws
    (`stochastic_draws`, or `pcg64_torch.draws` on the device) held in int64, the same integer steps, so the same
    bits. Runs in int64, where numpy's uint32 wraps below the normal range; those lanes take the subnormal result
    either way. Kept next to the numpy steps: a change to one is a change to both (a test holds them equal on every
    kind of value)."""
    spec = _spec(dtype)
    sign = torch.where(x.view(torch.int32) < 0, 0x80, 0)
    a = x.abs().clamp(max=spec.max)  # NaN stays NaN
    bits = a.view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    shift = 23 - spec.man
    code = (((draws >> (32 - shift)) + bits) >> shift) - ((127 - spec.bias) << spec.man)
    low = a < 2.0 ** (1 - spec.bias)  # the fp8 subnormal range; NaN is not in it
    fixed = (a * 2.0 ** (spec.bias + 30)).to(torch.int64)  # exact scaling, truncated, as numpy's cast
    fixed = (fixed + (draws >> (spec.man + 1))) >> (31 - spec.man)
    code = torch.where(low, fixed, code).clamp(max=spec.nan) | sign
    return code.to(torch.uint8)


_TABLES: dict[str, np.ndarray] = {}


def decode_fp8(bits: np.ndarray, dtype: str) -> np.ndarray:
    """fp8 bits -> float32 values (exact, NaNs keep their sign), by table: what torch's cast gives."""
    table = _TABLES.get(dtype)
    if table is None:
        _spec(dtype)
        codes = np.arange(256, dtype=np.uint8)
        table = Tensor(codes, dtype).values().astype(np.float32)
        table = _TABLES[dtype] = np.copysign(table, np.where(codes & 0x80, -1, 1).astype(np.float32))  # NaN too
    return table[np.asarray(bits, dtype=np.uint8)]


# -- scaled fp8 --------------------------------------------------------------------------------------

def dequantize_scaled(q_bits: np.ndarray, dtype: str, scale) -> np.ndarray:
    """W = q * scale in float32, as ComfyUI does (`weight.to(float32) * scale_weight`). `scale` may be a
    scalar or any array that broadcasts (per-row scales)."""
    values = decode_fp8(q_bits, dtype)
    scale = np.asarray(scale, dtype=np.float32)
    if np.broadcast_shapes(values.shape, scale.shape) != values.shape:
        return values * scale
    return np.multiply(values, scale, out=values)


def compute_scale(w: np.ndarray, dtype: str) -> np.ndarray:
    """amax(|w|) / max as a float32 scalar, ComfyUI's `scale="recalculate"` / `scale=None`
    (`TensorCoreFP8Layout.quantize`). An all-zero weight gets scale 1 (ComfyUI would divide by zero and
    store NaN); a non-finite weight is refused."""
    w = np.asarray(w)
    if w.size == 0:
        return np.ones((), np.float32)
    return scale_for_amax(max(np.max(w), -np.min(w)), dtype)  # no |w| temporary; NaN propagates


def scale_for_amax(amax, dtype: str) -> np.ndarray:
    """`compute_scale` from a weight's amax(|w|), found wherever the weight lives (a device finds it there)."""
    amax = np.float32(amax)
    if not np.isfinite(amax):
        raise ValueError("cannot compute an fp8 scale: the weight holds inf or NaN")
    if amax == 0:
        return np.ones((), np.float32)
    return np.array(amax / np.float32(fp8_max(dtype)), dtype=np.float32)


def quantize_scaled(w: np.ndarray, dtype: str, *, stochastic: bool = False, seed: int | None = None,
                    scale=None, threads: int = 1, pool=None) -> tuple[np.ndarray, np.ndarray]:
    """Quantize `w` to scaled fp8: returns (bits uint8, scale float32) with w ≈ dequant(bits) * scale.

    `scale=None` recomputes it as amax(|w|)/max (`compute_scale`), as ComfyUI does after a LoRA patch on a
    comfy_quant layer (`set_weight` -> `from_float(scale=None)`); pass the old scale to keep it, as
    ComfyUI 0.3.x does for a legacy layer (`scaled_fp8_ops.set_weight`; what no longer fits saturates).
    As in ComfyUI's `TensorCoreFP8Layout.quantize`, float32(w) is multiplied by the float32 reciprocal
    of the scale, so the round-to-nearest result matches it bit for bit (the legacy `set_weight`
    divides instead, which can differ by one float32 ulp before rounding). A scalar scale is applied chunk by chunk (no full-size temporary); a
    broadcastable array (per-row scales) is applied at once. `threads`/`pool`: as in `round_fp8`."""
    spec = _spec(dtype)
    scale = compute_scale(w, dtype) if scale is None else np.asarray(scale, dtype=np.float32)
    inverse = reciprocal(scale)
    if inverse.size == 1:
        return _round(w, spec, stochastic, seed, inverse.reshape(())[()], threads, pool), scale
    scaled = np.asarray(w, dtype=np.float32) * inverse
    return _round(scaled, spec, stochastic, seed, None, threads, pool), scale


def reciprocal(scale: np.ndarray) -> np.ndarray:
    """float32(1) / scale: what scaled fp8 multiplies a weight by before rounding. A scale that is not positive and
    finite, or whose reciprocal overflows, is refused."""
    with np.errstate(divide="ignore", over="ignore"):
        inverse = np.float32(1.0) / scale
    if not np.all(np.isfinite(inverse)) or not np.all(scale > 0):
        raise ValueError(f"fp8 scale must be positive and finite, with a finite reciprocal (got {scale})")
    return inverse


# -- ComfyUI layouts: reading ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ScaledLayer:
    """One quantized layer: `name` + ".weight" holds the fp8 bits."""

    name: str
    layout: str  # "legacy" | "comfy_quant"
    format: str | None  # "float8_e4m3fn", "float8_e5m2", another ComfyUI format ("nvfp4", ...), or None
    weight_dtype: str | None  # dtype of `<name>.weight` in the file (None: the key is absent)
    scale_key: str | None  # `<name>.scale_weight` (legacy) or `<name>.weight_scale`
    input_scale_key: str | None  # `<name>.scale_input` (legacy) or `<name>.input_scale`
    conf_key: str | None  # `<name>.comfy_quant`, when the configuration is stored as a tensor
    full_precision_matrix_mult: bool = False

    @property
    def dtype(self) -> str | None:
        """The fp8 dtype the weight bits are in (from the file, else from the format)."""
        if self.weight_dtype in FP8_DTYPES:
            return self.weight_dtype
        return FORMAT_DTYPES.get(self.format or "")


@dataclasses.dataclass(frozen=True)
class ScaledFp8Info:
    layout: str | None  # "legacy", "comfy_quant", "mixed" (both) or None (neither)
    markers: dict  # legacy marker key -> (fp8 dtype it declares, full_precision_matrix_mult or None)
    layers: dict  # layer name -> ScaledLayer

    @property
    def aux_keys(self) -> set[str]:
        """Keys that are quantization bookkeeping, not weights: markers, scales, configurations."""
        keys = set(self.markers)
        for layer in self.layers.values():
            keys.update(k for k in (layer.scale_key, layer.input_scale_key, layer.conf_key) if k)
        return keys


def _entry(value) -> tuple[str, tuple | None]:
    if isinstance(value, str):
        return value, None
    if isinstance(value, Tensor):
        return value.dtype, value.shape
    if isinstance(value, Mapping):
        return value["dtype"], tuple(value["shape"]) if "shape" in value else None
    dtype, shape = value
    return dtype, None if shape is None else tuple(shape)


def parse_comfy_quant(value) -> dict:
    """A `<layer>.comfy_quant` tensor (Tensor, uint8 array or bytes) -> its configuration dict."""
    if isinstance(value, Tensor):
        value = value.array
    raw = value if isinstance(value, (bytes, bytearray)) else np.asarray(value, dtype=np.uint8).tobytes()
    conf = json.loads(raw.decode("utf-8"))
    if not isinstance(conf, dict):
        raise ValueError(f"comfy_quant configuration is not a JSON object: {raw[:80]!r}")
    return conf


def parse_quantization_metadata(metadata: Mapping[str, str] | None) -> dict | None:
    """The `layers` of the header metadata `_quantization_metadata`, or None when absent."""
    if not metadata or METADATA_KEY not in metadata:
        return None
    quant = json.loads(metadata[METADATA_KEY])
    if not isinstance(quant, dict) or not isinstance(quant.get("layers"), dict):
        raise ValueError(f"{METADATA_KEY} has no 'layers' object")
    return {k: ({"format": v} if isinstance(v, str) else dict(v)) for k, v in quant["layers"].items()}


def detect_scaled_fp8(entries: Mapping, metadata: Mapping[str, str] | None = None,
                      read: Callable[[str], object] | None = None) -> ScaledFp8Info:
    """Find ComfyUI's scaled-fp8 layers from the keys and dtypes of a file (layer names exactly as the
    file or its header metadata spells them).

    `entries`: key -> dtype string, (dtype, shape), a safetensors header entry or a `Tensor`; `metadata`:
    the header's `__metadata__`; `read(key)`: optional, returns a `<layer>.comfy_quant` tensor so its
    format is known (without it, the format comes from the header metadata or the weight's dtype).
    A legacy `.scale_weight` belongs to the longest marker prefix it starts with; without any marker it
    is not ComfyUI's layout (kohya's fp8 loaders write `scale_weight` too) and is not reported."""
    info = {k: _entry(v) for k, v in entries.items()}
    markers = {}
    for key, (dtype, shape) in info.items():
        if (key == "scaled_fp8" or key.endswith(".scaled_fp8")) and dtype in FP8_DTYPES + ("F32",):
            size = None if shape is None else int(np.prod(shape, dtype=np.int64))
            markers[key] = ("F8_E4M3" if dtype == "F32" else dtype, None if size is None else size == 2)
    prefixes = sorted(((k[:-len("scaled_fp8")], k) for k in markers), key=lambda p: -len(p[0]))
    layers: dict[str, ScaledLayer] = {}

    def weight_dtype(name):
        return info.get(f"{name}.weight", (None, None))[0]

    for key in info:
        if not key.endswith(".scale_weight"):
            continue
        marker = next((m for p, m in prefixes if key.startswith(p)), None)
        if marker is None:
            continue
        name = key[:-len(".scale_weight")]
        dtype, fpmm = markers[marker]
        layers[name] = ScaledLayer(name, "legacy", COMFY_FORMATS[dtype], weight_dtype(name), key,
                                   f"{name}.scale_input" if f"{name}.scale_input" in info else None, None,
                                   bool(fpmm))

    confs: dict[str, tuple[dict | None, str | None]] = {}
    for name, conf in (parse_quantization_metadata(metadata) or {}).items():
        confs[name] = (conf, None)
    for key in info:
        if key.endswith(".comfy_quant"):
            name = key[:-len(".comfy_quant")]
            conf = parse_comfy_quant(read(key)) if read is not None else confs.get(name, (None, None))[0]
            confs[name] = (conf, key)
    for name, (conf, conf_key) in confs.items():
        wd = weight_dtype(name)
        fmt = conf.get("format") if conf else COMFY_FORMATS.get(wd or "")
        layers[name] = ScaledLayer(
            name, "comfy_quant", fmt, wd,
            f"{name}.weight_scale" if f"{name}.weight_scale" in info else None,
            f"{name}.input_scale" if f"{name}.input_scale" in info else None, conf_key,
            bool(conf and conf.get("full_precision_matrix_mult", False)))

    kinds = {layer.layout for layer in layers.values()} | ({"legacy"} if markers else set())
    layout = None if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"
    return ScaledFp8Info(layout, markers, layers)


# -- ComfyUI layouts: writing ------------------------------------------------------------------------

def scaled_fp8_marker(dtype: str, *, full_precision_matrix_mult: bool = False) -> Tensor:
    """The legacy marker tensor `<prefix>scaled_fp8`: empty, in the fp8 dtype (ComfyUI writes
    `torch.tensor([], dtype=...)`); 2 elements tell ComfyUI not to use fp8 matrix multiplication."""
    _spec(dtype)
    return Tensor(np.zeros(2 if full_precision_matrix_mult else 0, np.uint8), dtype)


def comfy_quant_conf(dtype: str, *, full_precision_matrix_mult: bool = False) -> dict:
    conf = {"format": COMFY_FORMATS[dtype]}
    if full_precision_matrix_mult:
        conf["full_precision_matrix_mult"] = True
    return conf


def encode_comfy_quant(conf: Mapping) -> Tensor:
    """The `<layer>.comfy_quant` tensor: uint8 bytes of `json.dumps(conf)` (ComfyUI's own spelling)."""
    return Tensor(np.frombuffer(json.dumps(dict(conf)).encode("utf-8"), np.uint8).copy(), "U8")


def quantization_metadata(layers: Mapping[str, Mapping]) -> str:
    """The header metadata value for `_quantization_metadata`, as ComfyUI saves it."""
    return json.dumps({"format_version": "1.0", "layers": {k: dict(v) for k, v in layers.items()}})


def _f32(value) -> Tensor:
    return Tensor(np.array(value, dtype=np.float32), "F32")


def scaled_layer_tensors(name: str, bits: np.ndarray, dtype: str, scale, *, layout: str,
                         input_scale=None, full_precision_matrix_mult: bool = False,
                         conf_tensor: bool = True) -> dict[str, Tensor]:
    """The tensors of one quantized layer in `layout` ("legacy" or "comfy_quant").

    legacy: `.weight`, `.scale_weight`, optional `.scale_input` (the file also needs one
    `scaled_fp8_marker`). comfy_quant: `.weight`, `.weight_scale`, optional `.input_scale`, and
    `.comfy_quant` unless `conf_tensor=False` (then list the layer in `quantization_metadata`)."""
    _spec(dtype)
    out = {f"{name}.weight": Tensor(np.asarray(bits, dtype=np.uint8), dtype)}
    if layout == "legacy":
        out[f"{name}.scale_weight"] = _f32(scale)
        if input_scale is not None:
            out[f"{name}.scale_input"] = _f32(input_scale)
    elif layout == "comfy_quant":
        out[f"{name}.weight_scale"] = _f32(scale)
        if input_scale is not None:
            out[f"{name}.input_scale"] = _f32(input_scale)
        if conf_tensor:
            conf = comfy_quant_conf(dtype, full_precision_matrix_mult=full_precision_matrix_mult)
            out[f"{name}.comfy_quant"] = encode_comfy_quant(conf)
    else:
        raise ValueError(f"unknown scaled-fp8 layout {layout!r} (expected 'legacy' or 'comfy_quant')")
    return out
