"""Merge math on row blocks of one base weight, in float64.

W' = W + sum_i ratio_i * scale_i * delta_i, each delta computed only for the rows the block needs. DoRA follows
PEFT's convention (DoraLinearVariant.merge_unsafe): W' = m / ||W + r*s*B@A||_row * (W + r*s*B@A), the norm taken
per output row over the input dims of the weight as it stands when that adapter is applied; the magnitude m is not
scaled by the ratio. Everything is row-local, so processing a weight in row blocks is exact.
"""
from __future__ import annotations

import numpy as np

from ..errors import ShapeMismatch
from ..lora import Adapter
from .plan import Patch


class DeltaCache:
    """Full deltas of adapters that are not plain LoRA (LoHa, LoKr, Tucker), computed once per base weight."""

    def __init__(self):
        self._full: dict[int, np.ndarray] = {}

    def full(self, a: Adapter) -> np.ndarray:
        key = id(a)
        if key not in self._full:
            self._full[key] = a.delta()
        return self._full[key]


def delta_rows(a: Adapter, idx: np.ndarray, cache: DeltaCache) -> np.ndarray | None:
    """Rows `idx` of the adapter's delta (scale applied, ratio not), float64."""
    t = a.tensors
    if a.kind == "lora" and "mid" not in t:
        up = t["up"][idx].values()
        down = t["down"].values()
        d = (up.reshape(len(idx), -1) @ down.reshape(down.shape[0], -1)) * a.scale
        d = d.reshape(len(idx), *down.shape[1:])
        if "diff" in t:
            d = d + t["diff"][idx].values().reshape(d.shape)
        return d
    full = cache.full(a)
    return None if full is None else full[idx]


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
    """Add every patch's delta to `w` (float64, the rows `rows` of a weight), in order; returns `w`."""
    base_rows = np.arange(rows.start, rows.stop)
    for p in patches:
        idx = base_rows if p.row_map is None else p.row_map[base_rows]
        hit = idx >= 0
        if not hit.any():
            continue
        sel = np.flatnonzero(hit)
        d = delta_rows(p.adapter, idx[sel], cache)
        m = magnitude(p.adapter)
        target = w[sel]
        if d is not None:
            if d.size != target.size:
                raise ShapeMismatch(
                    f"{p.adapter.module}: the LoRA's delta has {d[0].size} inputs per row, the base weight "
                    f"{target[0].size}: a LoRA for another model size.")
            target = target + p.ratio * d.reshape(target.shape)
        if m is not None:
            flat = target.reshape(len(sel), -1)
            norm = np.linalg.norm(flat, axis=1)
            target = (flat * (m[idx[sel]] / norm)[:, None]).reshape(target.shape)
        w[sel] = target
    return w


def apply_bias(b: np.ndarray, patches: list[Patch]) -> np.ndarray:
    rows = np.arange(b.shape[0])
    for p in patches:
        idx = rows if p.row_map is None else p.row_map[rows]
        sel = np.flatnonzero(idx >= 0)
        b[sel] += p.ratio * p.adapter.tensors["diff_b"][idx[sel]].values()
    return b
