"""A numpy array tagged with its safetensors dtype, so lorabox moves LoRA tensors without importing torch.

numpy has no bfloat16 or float8: those are held as their raw bits (uint16 / uint8) and decoded only when a
value is needed. Slicing, stacking and reordering move bits and are exact for every dtype.
"""
from __future__ import annotations

import numpy as np

NATIVE = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
          "BOOL": np.bool_}
BITS = {"BF16": np.uint16, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8}
SIGN_MASK = {"BF16": (np.uint16, 0x7FFF), "F16": (np.uint16, 0x7FFF), "F32": (np.uint32, 0x7FFFFFFF),
             "F64": (np.uint64, 0x7FFFFFFFFFFFFFFF), "F8_E4M3": (np.uint8, 0x7F), "F8_E5M2": (np.uint8, 0x7F)}
FLOAT_RANK = {"F8_E5M2": 0, "F8_E4M3": 0, "BF16": 1, "F16": 1, "F32": 2, "F64": 3}


def storage_dtype(dtype: str) -> np.dtype:
    try:
        return np.dtype(NATIVE.get(dtype) or BITS[dtype])
    except KeyError:
        raise ValueError(f"unsupported safetensors dtype {dtype!r}") from None


class Tensor:
    __slots__ = ("array", "dtype")

    def __init__(self, array: np.ndarray, dtype: str):
        self.array = array
        self.dtype = dtype

    # -- structure (bit moves, exact) --
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def __getitem__(self, index) -> "Tensor":
        return Tensor(self.array[index], self.dtype)

    def reshape(self, *shape) -> "Tensor":
        return Tensor(self.array.reshape(*shape), self.dtype)

    def copy(self) -> "Tensor":
        return Tensor(np.array(self.array, order="C"), self.dtype)

    def bits_equal(self, other: "Tensor") -> bool:
        return self.dtype == other.dtype and self.shape == other.shape and \
            np.array_equal(self.array.reshape(-1).view(np.uint8), other.array.reshape(-1).view(np.uint8))

    @staticmethod
    def zeros(shape, dtype: str) -> "Tensor":
        return Tensor(np.zeros(shape, storage_dtype(dtype)), dtype)  # all-zero bits are +0.0 in every float

    @staticmethod
    def concat(tensors: list["Tensor"], axis: int = 0) -> "Tensor":
        dtype = tensors[0].dtype
        if any(t.dtype != dtype for t in tensors):
            raise ValueError("concat needs one dtype")
        return Tensor(np.concatenate([t.array for t in tensors], axis=axis), dtype)

    # -- values --
    def values(self) -> np.ndarray:
        """The values as float64 (exact for every float dtype lorabox reads)."""
        a = self.array
        if self.dtype == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        if self.dtype in ("F8_E4M3", "F8_E5M2"):
            return _decode_f8(a, self.dtype)
        if self.dtype == "F16":
            return f16_to_f32(a).astype(np.float64)
        return a.astype(np.float64)

    def nonzero(self) -> np.ndarray:
        """Elementwise value != 0, from the bits (a negative zero is zero)."""
        if self.dtype in SIGN_MASK:
            bits = self.array.view(SIGN_MASK[self.dtype][0])
            return (bits & SIGN_MASK[self.dtype][1]) != 0
        return self.array != 0

    def values32(self) -> np.ndarray:
        """The values as float32: exact for 16- and 8-bit floats, and cheaper than float64."""
        if self.dtype == "BF16":
            return (self.array.astype(np.uint32) << 16).view(np.float32)
        if self.dtype == "F16":
            return f16_to_f32(self.array)
        if self.dtype == "F32":
            return self.array.astype(np.float32)
        return self.values().astype(np.float32)

    @staticmethod
    def from_values(values: np.ndarray, dtype: str) -> "Tensor":
        """Round float values to `dtype` (round-to-nearest-even)."""
        if dtype == "BF16":
            f = np.asarray(values, dtype=np.float32)
            u = f.view(np.uint32) if f.flags.c_contiguous else np.ascontiguousarray(f).view(np.uint32)
            r = u >> 16  # round to nearest even: add 0x7FFF plus the lowest kept bit, then truncate
            r &= 1
            r += 0x7FFF
            r += u
            r >>= 16
            out = r.astype(np.uint16)
            if (out & 0x7F80 == 0x7F80).any():  # inf/nan in the output: keep nan a (quiet) nan
                out[np.isnan(f)] = 0x7FC0
            return Tensor(out.reshape(f.shape), "BF16")
        if dtype in NATIVE:
            return Tensor(np.asarray(values).astype(NATIVE[dtype]), dtype)
        raise ValueError(f"cannot round to {dtype}")

    @staticmethod
    def scalar(value: float, dtype: str = "F32") -> "Tensor":
        return Tensor.from_values(np.array(value, dtype=np.float64), dtype)

    def __repr__(self) -> str:
        return f"Tensor({self.dtype}, {list(self.shape)})"


# numpy widens float16 in a scalar loop; a lookup in the table of all 65536 halves is 2x faster (measured in CPU
# time on 2 MiB blocks; an integer-arithmetic encoder the other way was 3x slower than numpy's, so encoding stays
# `astype`).
_F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def f16_to_f32(a: np.ndarray) -> np.ndarray:
    """float16 (array or its uint16 bits) -> float32, exactly."""
    return np.take(_F16_TABLE, np.ascontiguousarray(a).view(np.uint16))


def promote(a: str, b: str) -> str:
    if a == b:
        return a
    if FLOAT_RANK.get(a, -1) == FLOAT_RANK.get(b, -1):
        return "F32"  # bf16 with f16 (or two fp8 kinds): widen
    return a if FLOAT_RANK.get(a, -1) > FLOAT_RANK.get(b, -1) else b


def _decode_f8(a: np.ndarray, dtype: str) -> np.ndarray:
    exp_bits, man_bits, bias = (4, 3, 7) if dtype == "F8_E4M3" else (5, 2, 15)
    a = a.astype(np.int64)
    sign = np.where(a >> 7, -1.0, 1.0)
    e = (a >> man_bits) & ((1 << exp_bits) - 1)
    m = a & ((1 << man_bits) - 1)
    normal = sign * (1 + m / (1 << man_bits)) * np.exp2(e - bias)
    sub = sign * (m / (1 << man_bits)) * np.exp2(1 - bias)
    out = np.where(e == 0, sub, normal)
    if dtype == "F8_E4M3":
        out = np.where((e == 15) & (m == 7), np.nan, out)
    else:
        out = np.where(e == 31, np.where(m == 0, sign * np.inf, np.nan), out)
    return out
