"""Merge math on row blocks of one base weight, in float64.

W' = W + sum_i ratio_i * scale_i * delta_i, each delta computed only for the rows the block needs. DoRA follows
PEFT's convention (DoraLinearVariant.merge_unsafe): W' = m / ||W + r*s*B@A||_row * (W + r*s*B@A), the norm taken
per output row over the input dims of the weight as it stands when that adapter is applied; the magnitude m is not
scaled by the ratio. Everything is row-local, so processing a weight in row blocks is exact.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import ShapeMismatch
from ..lora import Adapter
from .plan import Patch


class DeltaCache:
    """Per base weight: decoded `down` factors (float64, flattened) of plain LoRAs, and the full deltas of the
    other kinds (LoHa, LoKr, Tucker), each computed once rather than per row block."""

    def __init__(self):
        self._full: dict[int, np.ndarray] = {}
        self._down: dict[int, np.ndarray] = {}

    def down(self, a: Adapter) -> np.ndarray:
        key = id(a)
        if key not in self._down:
            d = a.tensors["down"].values()
            self._down[key] = d.reshape(d.shape[0], -1)
        return self._down[key]

    def warm(self, a: Adapter) -> None:
        """Decode what the row blocks of `a` share, once (row blocks may then run on several threads)."""
        if a.kind == "lora" and "mid" not in a.tensors:
            self.down(a)
        else:
            self.full(a)

    def full(self, a: Adapter) -> np.ndarray:
        key = id(a)
        if key not in self._full:
            self._full[key] = a.delta()
        return self._full[key]


def delta_rows(a: Adapter, idx: np.ndarray | slice, cache: DeltaCache, ratio: float = 1.0) -> np.ndarray | None:
    """Rows `idx` of the adapter's delta times `ratio` (scale applied), float64."""
    t = a.tensors
    if a.kind == "lora" and "mid" not in t:
        up = t["up"][idx].values()
        n = up.shape[0]
        d = (up.reshape(n, -1) @ cache.down(a)).reshape(n, *t["down"].shape[1:])
        # in the order of the definition, ratio * (scale * up@down + diff), so the float64 value is the same
        if "diff" in t:
            if a.scale != 1.0:
                d *= a.scale
            d += t["diff"][idx].values().reshape(d.shape)
            if ratio != 1.0:
                d *= ratio
            return d
        for f in multipliers(a.scale, ratio):
            d *= f
        return d
    full = cache.full(a)
    return None if full is None else ratio * full[idx]


def multipliers(scale: float, ratio: float) -> tuple[float, ...]:
    """The factors that take up@down to ratio * (scale * up@down), in float64 multiplies in this order. That is two
    roundings; when either factor is a power of two (alpha = rank / 2, alpha = 1 with a power-of-two rank, ratio
    0.5) their product is exact and one multiply rounds to the same value (binary scaling commutes with rounding,
    away from float64's subnormals), so one pass over the delta is saved."""
    fs = tuple(f for f in (scale, ratio) if f != 1.0)
    if len(fs) == 2 and (math.frexp(scale)[0] == 0.5 or math.frexp(ratio)[0] == 0.5):
        return (scale * ratio,)
    return fs


def magnitude(a: Adapter) -> np.ndarray | None:
    t = a.tensors
    if "magnitude" in t:
        return t["magnitude"].values().reshape(-1)
    if "dora_scale" in t:
        ds = t["dora_scale"]
        if ds.shape[0] == 1 and ds.ndim >= 2 and ds.shape[1] != 1:
            raise ShapeMismatch(f"{a.module}: DoRA magnitude {list(ds.shape)} is on the input axis; lorabox merges "
                                f"output-axis (PEFT) DoRA only.")
        return ds.values().reshape(-1)
    return None


def apply_weight_block(w: np.ndarray, rows: slice, patches: list[Patch], cache: DeltaCache) -> np.ndarray:
    """Add every patch's delta to `w` (float64, the rows `rows` of a weight), in order, in place; returns `w`."""
    for p in patches:
        if p.row_map is None:  # the common case: the whole weight, rows as they are (slices, no copies)
            sel, idx = slice(None), rows
        else:
            mapped = p.row_map[rows]
            keep = np.flatnonzero(mapped >= 0)
            if not len(keep):
                continue
            sel, idx = keep, mapped[keep]
        target = w[sel]  # a view for slices, a copy for index arrays (written back below)
        d = delta_rows(p.adapter, idx, cache, p.ratio)
        if d is not None:
            if d.size != target.size:
                raise ShapeMismatch(
                    f"{p.adapter.module}: the LoRA's delta has {d[0].size} inputs per row, the base weight "
                    f"{target[0].size}: a LoRA for another model size.")
            target += d.reshape(target.shape)
        m = magnitude(p.adapter)
        if m is not None:
            flat = target.reshape(target.shape[0], -1)
            flat *= (m[idx] / np.linalg.norm(flat, axis=1))[:, None]
        if not isinstance(sel, slice):
            w[sel] = target
    return w


def apply_bias(b: np.ndarray, patches: list[Patch]) -> np.ndarray:
    rows = np.arange(b.shape[0])
    for p in patches:
        idx = rows if p.row_map is None else p.row_map[rows]
        sel = np.flatnonzero(idx >= 0)
        b[sel] += p.ratio * p.adapter.tensors["diff_b"][idx[sel]].values()
    return b
