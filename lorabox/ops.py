"""Named tensor transforms between key-map layouts. Each declares its inverse, so a table names an op
once and the reverse direction is derived, never written twice.

Row ops act on an adapter's output-row tensors (`up`, `diff`, `diff_b`, `magnitude`, output-axis
`dora_scale`); `down` is untouched. Fuse/split move adapters between a canonical weight and its row slices:
they move bits only, except where unequal scales must be reconciled (`fold_alpha`), which stays exact
whenever the dtype allows it and otherwise widens to float32.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import ShapeMismatch, UnsupportedConversion
from .lora import ROW_ROLES, Adapter
from .tensor import Tensor, promote


def swap_halves_rows(n: int) -> np.ndarray:
    """Row permutation swapping the two halves: BFL's adaLN (shift, scale) <-> diffusers' (scale, shift)."""
    if n % 2:
        raise ShapeMismatch(f"swap_halves needs an even number of rows, got {n}")
    return np.concatenate([np.arange(n // 2, n), np.arange(0, n // 2)])


# name -> (rows of canonical -> diffusers layout, rows of the inverse): `diffusers = canonical[perm(n)]`
ROW_OPS = {"swap_halves": (swap_halves_rows, swap_halves_rows)}


def swap_halves(t: Tensor) -> Tensor:
    return t[swap_halves_rows(t.shape[0])]


def _is_row_tensor(role: str, t: Tensor) -> bool:
    if role == "dora_scale":
        return t.shape[0] != 1  # [1, in] is an input-axis magnitude
    return role in ROW_ROLES


def apply_row_op(adapter: Adapter, op: str | None, *, inverse: bool = False) -> Adapter:
    if op is None:
        return adapter
    perm = ROW_OPS[op][1 if inverse else 0]
    tensors = {r: t[perm(t.shape[0])] if _is_row_tensor(r, t) else t for r, t in adapter.tensors.items()}
    return Adapter(adapter.component, adapter.module, adapter.part, tensors, adapter.alpha)


# (bits view, exponent shift, exponent mask) of the float dtypes whose exponent field can be shifted in place
_EXPONENT = {"BF16": (np.uint16, 7, 0xFF), "F16": (np.uint16, 10, 0x1F), "F32": (np.uint32, 23, 0xFF)}


def _scale_pow2(t: Tensor, k: int) -> Tensor | None:
    """`t * 2**k` by moving exponent bits (exact); None when some value would leave the normal range."""
    if t.dtype not in _EXPONENT or k == 0:
        return None if k else t
    view, shift, emax = _EXPONENT[t.dtype]
    bits = t.array.view(view)
    e = (bits >> view(shift)) & view(emax)
    # zeros (either sign) stay as they are; other values need a normal exponent before and after
    edge = (e <= -k) if k < 0 else (e >= emax - k)
    edge |= e == 0
    out = bits + view((k % (1 << (8 * bits.itemsize - shift))) << shift)  # wraps like two's complement
    if edge.any():
        magnitude = bits[edge] & view((1 << (8 * bits.itemsize - 1)) - 1)
        if magnitude.any():
            return None  # subnormal, overflow, inf or nan: let the float path decide
        out[edge] = bits[edge]
    return Tensor(out.view(t.array.dtype), t.dtype)


def scale_tensor(t: Tensor, factor: float) -> Tensor:
    """`t * factor` in `t`'s dtype when that is exact (e.g. powers of two), else in float32 (rel. error < 1e-7)."""
    if factor == 1.0:
        return t
    m, e = math.frexp(factor)
    if m == 0.5:
        fast = _scale_pow2(t, e - 1)
        if fast is not None:
            return fast
    # 16-bit floats: a float32 product is exact for powers of two and within 2^-24 otherwise
    wide = t.values32() * np.float32(factor) if t.dtype in ("BF16", "F16") and \
        math.frexp(factor)[0] == 0.5 else t.values() * factor
    same = Tensor.from_values(wide, t.dtype) if t.dtype in ("BF16", "F16", "F32", "F64") else None
    if same is not None and np.array_equal(same.values32() if wide.dtype == np.float32 else same.values(), wide):
        return same
    return Tensor.from_values(wide, "F32")


def fold_alpha(adapter: Adapter) -> Adapter:
    """The same delta with no alpha (scale 1): the scale moves into the factors."""
    return fold_alpha_with_factors(adapter)[0]


def fold_alpha_with_factors(adapter: Adapter) -> tuple[Adapter, dict[str, float]]:
    """`fold_alpha`, and the factor each tensor was multiplied by (what `unfold_alpha` needs to undo it)."""
    t = dict(adapter.tensors)
    s = adapter.scale
    kind = adapter.kind
    if adapter.alpha is None or kind == "full" or s == 1.0:
        return Adapter(adapter.component, adapter.module, adapter.part, t, None), {}
    factors: dict[str, float] = {}
    if kind == "lora":
        m, e = math.frexp(s)
        if m == 0.5:  # a power of two: split it between both factors, exactly, keeping magnitudes balanced
            e_down = (e - 1) // 2
            f_down, f_up = 2.0 ** e_down, 2.0 ** (e - 1 - e_down)
            down, up = scale_tensor(t["down"], f_down), scale_tensor(t["up"], f_up)
            if down.dtype == t["down"].dtype and up.dtype == t["up"].dtype:
                t["down"], t["up"] = down, up
                factors = {r: f for r, f in (("down", f_down), ("up", f_up)) if f != 1.0}
                return Adapter(adapter.component, adapter.module, adapter.part, t, None), factors
        factors = {"up": s}
    elif kind == "loha":
        factors = {"hada_w1_a": s}
    else:
        factors = {"lokr_w1" if "lokr_w1" in t else "lokr_w1_a": s}
    for role, f in factors.items():
        t[role] = scale_tensor(t[role], f)
    return Adapter(adapter.component, adapter.module, adapter.part, t, None), factors


def unfold_alpha(adapter: Adapter, alpha: Tensor, factors: dict[str, float], dtypes: dict[str, str]) -> Adapter | None:
    """Undo `fold_alpha_with_factors`: the original tensors and alpha, or None if folding them again would not
    give back exactly the tensors at hand (then they were changed since, and are better left as they are)."""
    t = dict(adapter.tensors)
    for role, f in factors.items():
        if role not in t:
            return None
        folded = t[role]
        original = Tensor.from_values(folded.values() / f, dtypes.get(role, folded.dtype))
        if not scale_tensor(original, f).bits_equal(folded):
            return None
        t[role] = original
    return Adapter(adapter.component, adapter.module, adapter.part, t, alpha)


def _out_rows(a: Adapter) -> int:
    for role, t in a.tensors.items():
        if _is_row_tensor(role, t):
            return t.shape[0]
    raise ShapeMismatch(f"{a.module}: the adapter has no tensor on the output rows")


def part_rows(parts: list[Adapter | None], split: tuple[int, ...], module: str) -> list[int]:
    """Row counts of every slice, from the slices present and the table's proportions."""
    units = set()
    for a, p in zip(parts, split):
        if a is not None:
            rows = _out_rows(a)
            if rows % p:
                raise ShapeMismatch(f"{module}: slice {a.part} has {rows} rows, not a multiple of {p}")
            units.add(rows // p)
    if len(units) != 1:
        raise ShapeMismatch(f"{module}: its slices have inconsistent sizes (units of {sorted(units)} rows)")
    unit = units.pop()
    return [unit * p for p in split]


def fuse(parts: list[Adapter | None], split: tuple[int, ...], module: str) -> Adapter:
    """Row slices -> one adapter on the whole weight: downs stacked, ups block-diagonal.

    Equal scales are kept (alpha grows with the rank, so alpha/rank is unchanged); unequal ones are folded
    into the factors first. Missing slices contribute zero rows.
    """
    present = [a for a in parts if a is not None]
    kinds = {a.kind for a in present}
    if kinds - {"lora", "full"} or any("mid" in a.tensors for a in present):
        raise UnsupportedConversion(
            f"{module}: cannot fuse {'/'.join(sorted(kinds))} slices into the one weight the target names.",
            hint="Only plain LoRA (down/up) slices fuse exactly; write diffusers, which names the slices.")
    rows = part_rows(parts, split, module)
    lora = [a for a in present if a.kind == "lora"]
    if len({a.scale for a in lora}) > 1:
        parts = [a if a is None or a.kind != "lora" else fold_alpha(a) for a in parts]
        present = [a for a in parts if a is not None]
        lora = [a for a in present if a.kind == "lora"]
    tensors: dict[str, Tensor] = {}
    alpha = None
    if lora:
        dtype = lora[0].tensors["up"].dtype
        for a in lora:
            dtype = promote(promote(dtype, a.tensors["up"].dtype), a.tensors["down"].dtype)
        shared = all(a.tensors["down"].bits_equal(lora[0].tensors["down"]) for a in lora[1:]) and \
            len({None if a.alpha is None else a.alpha_value for a in lora}) == 1
        if shared:  # the slices of one split adapter: one down, ups stacked by rows (the inverse of `split`)
            rank = lora[0].rank
            up = Tensor.zeros((sum(rows), rank), dtype)
            r0 = 0
            for a, n in zip(parts, rows):
                if a is not None and a.kind == "lora":
                    up.array[r0:r0 + n] = _as(a.tensors["up"], dtype).array
                r0 += n
            tensors["down"], tensors["up"] = _as(lora[0].tensors["down"], dtype), up
            alpha = lora[0].alpha
        else:  # independent slices: downs stacked, ups block-diagonal, alpha grown with the rank
            cols = [a.rank if a is not None and a.kind == "lora" else 0 for a in parts]
            total = sum(cols)
            up = Tensor.zeros((sum(rows), total), dtype)
            r0 = c0 = 0
            for a, n, c in zip(parts, rows, cols):
                if c:
                    up.array[r0:r0 + n, c0:c0 + c] = _as(a.tensors["up"], dtype).array.reshape(n, c)
                r0, c0 = r0 + n, c0 + c
            tensors["down"] = Tensor.concat([_as(a.tensors["down"], dtype) for a in lora])
            tensors["up"] = up
            if any(a.alpha is not None for a in lora):
                alpha = Tensor.scalar(lora[0].scale * total)
    for role in ("diff", "diff_b", "magnitude", "dora_scale"):
        have = [a for a in present if role in a.tensors]
        if not have:
            continue
        if len(have) != len(parts):
            raise UnsupportedConversion(f"{module}: `{role}` is present on some slices only; cannot fuse it.")
        tensors[role] = Tensor.concat([a.tensors[role] for a in parts])
    return Adapter(present[0].component, module, None, tensors, alpha)


def _as(t: Tensor, dtype: str) -> Tensor:
    return t if t.dtype == dtype else Tensor.from_values(t.values(), dtype)


def split(whole: Adapter, split: tuple[int, ...], module: str) -> list[Adapter]:
    """One adapter on a whole weight -> one per row slice: each keeps `down` and takes its rows of `up`.

    If `up` is block-diagonal (each rank column feeds one slice only, as after `fuse`), each slice keeps only
    its own columns of `up` and rows of `down`, with alpha scaled so alpha/rank is unchanged: fuse then split
    gives back the original tensors.
    """
    t = whole.tensors
    conv = "up" in t and t["up"].ndim > 2
    if whole.kind not in ("lora", "full") or "mid" in t or conv:
        raise UnsupportedConversion(
            f"{module}: a {whole.kind} adapter on the fused weight cannot be split into {len(split)} slices.",
            hint="Write a dialect that keeps the fused weight (kohya, comfyui or bfl).")
    if "dora_scale" in t and t["dora_scale"].shape[0] == 1:
        raise UnsupportedConversion(f"{module}: an input-axis DoRA magnitude cannot be split by rows.")
    total = _out_rows(whole)
    unit, rest = divmod(total, sum(split))
    if rest:
        raise ShapeMismatch(f"{module}: {total} rows do not split in proportions {list(split)}")
    bounds, r = [], 0
    for p in split:
        bounds.append((r, r + unit * p))
        r += unit * p
    columns = None
    if whole.kind == "lora":
        nz = t["up"].nonzero()
        used = [nz[a:b].any(axis=0) for a, b in bounds]
        if all(u.any() for u in used) and int(np.sum(used, axis=0).max()) <= 1:
            columns = [np.flatnonzero(u) for u in used]
    out = []
    for i, (a, b) in enumerate(bounds):
        tensors = {role: (x[a:b] if _is_row_tensor(role, x) else x).copy() for role, x in t.items()}
        alpha = None if whole.alpha is None else whole.alpha.copy()
        if columns is not None:
            cols = columns[i]
            tensors["up"] = tensors["up"][:, cols].copy()
            tensors["down"] = t["down"][cols].copy()
            if whole.alpha is not None:
                alpha = Tensor.scalar(whole.alpha_value * len(cols) / whole.rank, whole.alpha.dtype
                                      if whole.alpha.dtype in ("F32", "F16", "BF16", "F64") else "F32")
        out.append(Adapter(whole.component, module, i, tensors, alpha))
    return out
